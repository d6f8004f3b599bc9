"""Train the CIFAR-10 classifier: float phase, then quantization-aware training to INT8.

A thin wrapper over `adaptive_quant.cli.train` (installed as the console script `aq-train` too);
`--help` explains the options.
"""

from adaptive_quant.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
