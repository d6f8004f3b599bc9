"""The real gateway process (scripts/serve.py's server: uvicorn + drain on SIGTERM) over a
backend whose calls take `--delay-s` longer, so a test can hold requests in flight and signal
the process while they are.

    python tests/slow_gateway.py --repository REPO --port PORT --delay-s 1.5 [--drain-timeout-s 30]
"""

from __future__ import annotations

import argparse
import logging
import sys

from adaptive_quant.core.manifest import load_manifest
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.backends.embedded import EmbeddedBackend
from adaptive_quant.serving.server import run
from adaptive_quant.serving.settings import load_settings
from fake_backends import FakeSlowBackend  # tests/ is on sys.path: this script lives there


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repository", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-s", type=float, required=True)
    p.add_argument("--drain-timeout-s", type=float, default=30.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = load_settings(
        overrides={
            "repository": args.repository,
            "server.port": args.port,
            "server.drain_timeout_s": args.drain_timeout_s,
        },
        environ={},
    )
    backend = FakeSlowBackend(EmbeddedBackend(settings.repository, load_manifest(settings.repository)), args.delay_s)
    run(create_app(settings, backend=backend), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
