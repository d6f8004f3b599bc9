"""Start the adaptive-precision gateway (uvicorn) on a model repository.

    python scripts/serve.py                                   # embedded ONNX Runtime, configs/serve.yaml
    python scripts/serve.py --backend triton --triton-url 127.0.0.1:8001
    python scripts/serve.py --port 9000 --set routing.default_priority=speed
    python scripts/serve.py --grpc-port 8081                  # + Open Inference Protocol over gRPC
    python scripts/serve.py --workers 1                       # one process (default: one per CPU core)
    AQ_SERVER__API_KEY=s3cret python scripts/serve.py          # /v1/ calls need X-API-Key: s3cret
    aq-serve --engine ray                                     # Ray Serve: a local cluster, one deployment per variant
    aq-serve --engine ray --ray-address 10.0.0.5:6379          # ...joining a cluster (or RAY_ADDRESS)

Listens on 127.0.0.1 unless --host says otherwise. On SIGTERM or Ctrl-C it stops accepting
connections and lets the requests in flight finish (server.drain_timeout_s, 30 s) before exiting.
With several workers (server.workers, auto = one per CPU core) a supervisor process holds the
port and starts one gateway process per worker on it (serving/workers.py): worker 0 profiles the
host, the signal reaches every worker, a worker that dies is started again, /metrics sums them all.

--engine ray serves the same routes from a Ray Serve application instead (serving/ray/): an
ingress deployment `gateway` over a deployment `variant-<key>` per variant, replicas and
autoscaling from the `ray:` settings; a roll-out becomes an application update; SIGTERM drains,
deletes the application and stops the local cluster it started. Needs the `ray` extra.
"""

from __future__ import annotations

import argparse
import logging
import sys

from fastapi import FastAPI

from adaptive_quant.core.manifest import ManifestError
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.server import run
from adaptive_quant.serving.settings import ServeSettings, SettingsError, load_settings, parse_set
from adaptive_quant.serving.worker_role import WorkerRole
from adaptive_quant.serving.workers import Supervisor


def worker_app(settings: ServeSettings, role: WorkerRole) -> FastAPI:
    """One worker's gateway (the supervisor's app factory; module-level, so spawn can pickle it)."""
    return create_app(settings, worker=role)


def serve_on_ray(settings: ServeSettings, args: argparse.Namespace) -> int:
    """--engine ray: the settings checked here (what the ingress replicas will build), then the driver."""
    if settings.backend.kind != "embedded":
        raise SettingsError(
            "--engine ray runs the variants as Ray Serve deployments of their own (ONNX Runtime in each "
            "replica): backend.kind must stay embedded; a Triton backend is --engine uvicorn's"
        )
    if args.workers is not None:
        raise SettingsError(
            "--workers is --engine uvicorn's: on Ray the gateway runs as replicas, "
            "ray.ingress.min_replicas / max_replicas (e.g. --set ray.ingress.max_replicas=4)"
        )
    if settings.server.grpc_port:
        raise SettingsError(
            "--engine ray serves HTTP only (/v1 and the Open Inference Protocol's /v2 REST routes): "
            "server.grpc_port must be 0; the gRPC front is --engine uvicorn's"
        )
    create_app(settings)  # the repository and the variants checked before any cluster starts
    logging.basicConfig(
        level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from adaptive_quant.serving.ray.engine import run as run_on_ray

    print(
        f"serving {settings.repository} on Ray Serve: http://{settings.server.host}:{settings.server.port}", flush=True
    )
    return run_on_ray(settings)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/serve.yaml", help="settings file (default: %(default)s)")
    p.add_argument("--repository", help="model repository with manifest.json")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--workers", help="gateway processes on the port: a number or auto (one per CPU core; default)")
    p.add_argument("--grpc-port", type=int, help="serve the Open Inference Protocol over gRPC here too (default: off)")
    p.add_argument(
        "--engine",
        choices=["uvicorn", "ray"],
        default="uvicorn",
        help="uvicorn: worker processes on this host (default); ray: a Ray Serve application, one deployment per variant",
    )
    p.add_argument("--ray-address", help="--engine ray: the cluster to join (default: RAY_ADDRESS, else a local one)")
    p.add_argument("--backend", choices=["embedded", "triton"])
    p.add_argument("--triton-url", help="host:port of a Triton server")
    p.add_argument("--triton-protocol", choices=["grpc", "http"])
    p.add_argument("--api-key-file", help="require the key in this file as X-API-Key on every /v1/ call")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any setting")
    args = p.parse_args(argv)

    flags = {
        "repository": args.repository,
        "server.host": args.host,
        "server.port": args.port,
        "server.grpc_port": args.grpc_port,
        "server.workers": args.workers,
        "backend.kind": args.backend,
        "backend.triton_url": args.triton_url,
        "backend.triton_protocol": args.triton_protocol,
        "server.api_key_file": args.api_key_file,
        "ray.address": args.ray_address,
    }
    try:
        overrides = {k: v for k, v in flags.items() if v is not None} | parse_set(args.set)
        settings = load_settings(args.config if args.config else None, overrides)
        if args.engine == "ray":
            return serve_on_ray(settings, args)
        if settings.backend.kind == "ray":
            raise SettingsError(
                "backend.kind ray is what --engine ray gives its ingress replicas (their variants are Ray "
                "Serve deployments); to serve on Ray run aq-serve --engine ray, else use embedded or triton"
            )
        app = create_app(settings)
    except (SettingsError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    grpc = f" and grpc://{settings.server.host}:{settings.server.grpc_port}" if settings.server.grpc_port else ""
    workers = settings.server.resolved_workers()
    print(
        f"serving {settings.repository} ({settings.backend.kind} backend) on http://{settings.server.host}:{settings.server.port}{grpc}"
        + (f" with {workers} worker processes" if workers > 1 else "")
    )
    if workers > 1:
        # the app built above checked the settings and the repository; each worker builds its own
        try:
            return Supervisor(settings, args.config or None, overrides, workers, app_factory=worker_app).run()
        except OSError as exc:  # the port is taken, or the host is not an address of this machine
            print(f"error: {exc}", file=sys.stderr)
            return 2
    run(app, settings)  # until SIGTERM/SIGINT, then drains the requests in flight
    return 0


if __name__ == "__main__":
    sys.exit(main())
