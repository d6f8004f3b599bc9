"""App factory: `create_app(settings)` → the gateway's ASGI app (fronts/asgi.GatewayApp), whose
lifespan starts and stops the backend of the serving version (versions.json's, or the one version
of a repository without it), the service, its dataplane, the follower of the repository's
versions (follower.py: canary, promotion, rollback without a restart), and the gRPC front
(fronts/v2_grpc.py) when server.grpc_port is set.

  middleware   request id, API key (middleware.py): every route, the fast ones included
  fronts       v1 REST, v2 REST (fronts/v1_rest.py, v2_rest.py), v2 gRPC (fronts/v2_grpc.py)
  dataplane    accounting, metrics, errors (dataplane.py, errors.py), over the service
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from adaptive_quant.core.manifest import Manifest
from adaptive_quant.core.memory_policy import MemorySample
from adaptive_quant.serving.backends import Backend, make_backend
from adaptive_quant.serving.dataplane import DataPlane
from adaptive_quant.serving.factory import backend_options, build_service, load_version, serving_manifest
from adaptive_quant.serving.follower import VersionFollower
from adaptive_quant.serving.followup import RouterPredictor
from adaptive_quant.serving.fronts import v1_rest, v2_rest
from adaptive_quant.serving.fronts.asgi import GatewayApp, install_error_handlers
from adaptive_quant.serving.fronts.v2_grpc import GrpcFront
from adaptive_quant.serving.metrics import GatewayMetrics
from adaptive_quant.serving.middleware import ApiKeyMiddleware, RequestIdMiddleware
from adaptive_quant.serving.model import ServedModel
from adaptive_quant.serving.schemas import request_schemas
from adaptive_quant.serving.settings import ServeSettings, SettingsError
from adaptive_quant.serving.worker_role import WorkerRole

log = logging.getLogger(__name__)

__all__ = ["backend_options", "create_app"]  # backend_options: factory.py's, here for its callers


def create_app(
    settings: ServeSettings,
    backend: Backend | None = None,
    memory_probe: Callable[[], MemorySample] | None = None,
    router_predictor: RouterPredictor | None = None,
    worker: WorkerRole | None = None,
) -> GatewayApp:
    """Build the gateway. The serving version's manifest is read now (a missing repository fails
    here, clearly) and again at start-up (a worker started after a roll-out serves what serves
    then); the backend (given, or made from settings) is started and closed by the app's lifespan.
    `memory_probe` replaces the memory policy's measurement, `router_predictor` the manifest's router (tests).
    `worker`: this app is one of several gateway processes on one port (serving/workers.py)."""
    manifest = serving_manifest(settings.repository)
    unknown = sorted(set(settings.variants) - {v.key for v in manifest.served_variants()})
    if unknown:
        raise SettingsError(
            f"variants: {unknown} are not served variants of {settings.repository} "
            f"(served: {', '.join(v.key for v in manifest.served_variants())})"
        )
    metrics = GatewayMetrics()

    async def load(version_manifest: Manifest, serving: ServedModel) -> ServedModel:
        return await load_version(settings, version_manifest, serving, worker, router_predictor)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        man = serving_manifest(settings.repository)  # again: this worker may start after a roll-out
        b = backend
        if b is None:
            opts = backend_options(settings, worker.count if worker else 1)
            b = make_backend(settings.backend.kind, settings.repository, man, **opts)
        await b.start()
        # router, model, warm-up, this host's profiles (worker 0 measures for all), memory policy
        service = await build_service(
            settings,
            b,
            metrics,
            worker=worker,
            router_predictor=router_predictor,
            memory_probe=memory_probe,
            manifest=man,
        )
        found = service.model.router  # for the start-up line below
        app.state.service = service
        plane = app.state.dataplane = DataPlane(service)
        # everything allocated so far (modules, sessions, the manifest, the router) lives as long
        # as the process: take it out of the cyclic GC's scans, whose full passes over it were
        # pauses every caller in flight waits for
        gc.freeze()
        health = b.variants()
        log.info(
            "serving %s version %d with the %s backend; variants: %s; router: %s%s",
            man.model_name,
            man.version,
            b.name,
            ", ".join(f"{k}={'ok' if h.healthy else 'UNHEALTHY'}" for k, h in health.items()),
            found.summary,  # one line each; the structured detail is in /v1/status
            "" if found.predictor is not None else f"; single-stage routing on {service.model.prior.summary()}",
        )
        if not b.ready():
            log.error("no variant can serve: /readyz answers 503 and classify requests get 503")
        # versions.json: a live canary is loaded in the background now; with rollout.follow, every
        # change is followed (load, switch between requests, unload once idle)
        follower = VersionFollower(
            service,
            service.book,
            settings.repository,
            load,
            settings.rollout.poll_s,
            settings.server.drain_timeout_s,
        )
        follower.start(settings.rollout.follow)
        grpc_front = None
        if settings.server.grpc_port:
            grpc_front = GrpcFront(
                plane,
                settings.server.host,
                settings.server.grpc_port,
                settings.server.api_key,
                settings.limits.max_tensor_request_bytes,
                share_port=worker is not None and worker.count > 1,
            )
            await grpc_front.start()
            app.state.grpc = grpc_front  # server.py stops it when the HTTP drain begins
            log.info("Open Inference Protocol over gRPC on %s (inference.GRPCInferenceService)", grpc_front.address)
        try:
            yield
        finally:
            if grpc_front is not None:  # already stopping if server.py began the drain
                await grpc_front.stop(settings.server.drain_timeout_s)
            app.state.service = app.state.dataplane = None
            if service.memory_controller is not None:
                await service.memory_controller.close()
            await service.mirrors.close()
            await follower.close()  # every version it loaded but the serving one
            await service.versions.serving.backend.close()
            if b is not service.versions.serving.backend:  # idempotent: it may be closed already
                await b.close()

    app = GatewayApp(
        title="adaptive-quant gateway",
        version="0.1.0",
        description="One CIFAR-10 classifier at FP32, FP16 and INT8; every sample is routed to the "
        "precision that fits the caller's latency budget (X-Latency-Budget-Ms, X-Priority, X-Min-Precision).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.manifest = manifest
    app.state.metrics = metrics
    app.state.service = None
    app.state.dataplane = None  # the lifespan sets both once the service is built
    app.state.grpc = None
    install_error_handlers(app)
    v1_rest.install(app)
    v2_rest.install(app)
    generate_openapi = app.openapi

    def openapi() -> dict:  # the request schema depends on this service's image size and limits
        schema = generate_openapi()  # cached by FastAPI after the first call
        schema.setdefault("components", {}).setdefault("schemas", {}).update(
            request_schemas(manifest.image_size, settings.limits.max_instances)
        )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    # every route, the fast ones included; the last added is the outermost: a 401 carries the request id
    if settings.server.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.server.api_key, on_reject=metrics.unauthorized.inc)
    if settings.backend.kind != "ray":  # Ray Serve's proxy sets X-Request-Id itself (the caller's, else its own)
        app.add_middleware(RequestIdMiddleware)
    return app
