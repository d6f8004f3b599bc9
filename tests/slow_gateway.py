"""The real gateway process (scripts/serve.py's server: uvicorn + drain on SIGTERM) over a
backend whose calls take `--delay-s` longer, so a test can hold requests in flight and signal
the process while they are. With `--workers N` it runs N such gateways under the supervisor of
serving/workers.py, as `aq-serve --workers N` does; `--fail-worker I` makes worker I fail while
it builds its app (an injected start-up failure).

    python tests/slow_gateway.py --repository REPO --port PORT --delay-s 1.5 [--drain-timeout-s 30]
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys

from adaptive_quant.core.manifest import load_manifest
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.backends.embedded import EmbeddedBackend
from adaptive_quant.serving.server import run
from adaptive_quant.serving.settings import load_settings
from adaptive_quant.serving.workers import Supervisor, WorkerRole
from fake_backends import FakeSlowBackend  # tests/ is on sys.path: this script lives there


def slow_app(settings, role: WorkerRole | None, delay_s: float, fail_worker: int = -1):  # noqa: ANN001, ANN201
    if role is not None and role.index == fail_worker:
        raise RuntimeError(f"injected start-up failure of worker {role.index}")
    backend = FakeSlowBackend(EmbeddedBackend(settings.repository, load_manifest(settings.repository)), delay_s)
    return create_app(settings, backend=backend, worker=role)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repository", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-s", type=float, required=True)
    p.add_argument("--drain-timeout-s", type=float, default=30.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--fail-worker", type=int, default=-1)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {
        "repository": args.repository,
        "server.port": args.port,
        "server.drain_timeout_s": args.drain_timeout_s,
        "server.workers": args.workers,
    }
    settings = load_settings(overrides=overrides, environ={})
    if args.workers > 1:
        factory = functools.partial(slow_app, delay_s=args.delay_s, fail_worker=args.fail_worker)
        return Supervisor(settings, None, overrides, args.workers, app_factory=factory).run()
    run(slow_app(settings, None, args.delay_s), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
