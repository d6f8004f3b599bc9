"""The command-line entry points (`aq-*` console scripts; `scripts/*.py` wrap them) and their shared set-up.

One module per command, each with a `main(argv) -> exit code`; the library code they call stays free of `print`.
"""

from __future__ import annotations

import logging

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
# the ONNX exporter's optimiser logs one line per rewrite rule at INFO: useless at 3 a.m.
_NOISY = ("onnx_ir", "onnxscript", "torch.onnx")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
