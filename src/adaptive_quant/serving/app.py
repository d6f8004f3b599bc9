"""App factory: `create_app(settings)` → a FastAPI app whose lifespan starts and stops the backend
(and the gRPC front, oip_grpc.py, when server.grpc_port is set).

Domain errors become HTTP answers here, in one place:
  InputError (and FastAPI's own validation errors) → its 4xx, {"error": {"type", "message"}}
  ServiceUnavailable → 503 with Retry-After
  anything else → 500 "internal error" (a bug of ours, logged with its traceback)
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaptive_quant.core.manifest import load_manifest
from adaptive_quant.core.memory_policy import MemorySample
from adaptive_quant.serving.auth import ApiKeyMiddleware
from adaptive_quant.serving.backends import Backend, make_backend
from adaptive_quant.serving.errors import InputError, ServiceUnavailable, error_body
from adaptive_quant.serving.followup import LoadedRouter, RouterPredictor, load_router
from adaptive_quant.serving.hot_path import CLASSIFY_PATH, key_accepted, serve_classify
from adaptive_quant.serving.memory_control import MemoryController
from adaptive_quant.serving.metrics import GatewayMetrics
from adaptive_quant.serving.oip_grpc import GrpcFront
from adaptive_quant.serving.oip_http import INFER_PATH, serve_infer
from adaptive_quant.serving.oip_http import router as oip_router
from adaptive_quant.serving.routes import router as api_router
from adaptive_quant.serving.schemas import request_schemas
from adaptive_quant.serving.service import ClassifierService
from adaptive_quant.serving.settings import ServeSettings, SettingsError
from adaptive_quant.serving.workers import WorkerRole

log = logging.getLogger(__name__)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


class GatewayApp(FastAPI):
    """FastAPI, except that POST /v1/classify goes straight from the ASGI server to
    hot_path.serve_classify (see there why), and POST /v2/models/.../infer to
    oip_http.serve_infer: the other routes, the OpenAPI document and the
    probes keep FastAPI. A request the fast path cannot take (the service still starting, a
    missing or wrong API key) falls through to FastAPI, whose route and middleware answer it."""

    api_key: bytes | None = None

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - the ASGI signature
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            service = self.state.service
            if service is not None and key_accepted(scope, self.api_key):
                if path == CLASSIFY_PATH:
                    await serve_classify(service, scope, receive, send)
                    return
                if path.startswith("/v2/") and (match := INFER_PATH.match(path)):
                    await serve_infer(service, scope, receive, send, match)
                    return
        await super().__call__(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InputError)
    async def _input_error(_: Request, exc: InputError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(_: Request, exc: ServiceUnavailable) -> JSONResponse:
        return _error(503, exc.message, {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = ["/".join(str(p) for p in e.get("loc", ())) + ": " + e.get("msg", "") for e in exc.errors()]
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error while serving a request")
        return _error(500, "internal error; see the server log")


def backend_options(settings: ServeSettings, workers: int = 1) -> dict[str, Any]:
    """The keyword arguments `make_backend` gets for `settings.backend.kind`: the gateway's, and
    the benchmark's when it times the backend alone (so both run the same batcher settings).
    `workers`: gateway processes sharing this host's cores (instances: auto is divided among them)."""
    if settings.backend.kind == "triton":
        return {
            "url": settings.backend.triton_url,
            "protocol": settings.backend.triton_protocol,
            "model_control": settings.backend.model_control,
            "health_interval_s": settings.backend.health_interval_s,
        }
    return {
        "max_batch_size": settings.batching.max_batch_size,
        "max_queue_delay_us": settings.batching.max_queue_delay_us,
        "instances": settings.backend.resolved_instances(workers),
        "intra_op_threads": settings.backend.intra_op_threads,
        "verify_sha256": settings.backend.verify_sha256,
        "memory_arena": settings.backend.memory_arena,
        "inline_max_batch": settings.backend.inline_max_batch,
        "allow_spinning": settings.backend.allow_spinning,
    }


def create_app(
    settings: ServeSettings,
    backend: Backend | None = None,
    memory_probe: Callable[[], MemorySample] | None = None,
    router_predictor: RouterPredictor | None = None,
    worker: WorkerRole | None = None,
) -> FastAPI:
    """Build the gateway. The manifest is read now (a missing repository fails here, clearly);
    the backend (given, or made from settings) is started and closed by the app's lifespan.
    `memory_probe` replaces the memory policy's measurement, `router_predictor` the manifest's router (tests).
    `worker`: this app is one of several gateway processes on one port (serving/workers.py)."""
    manifest = load_manifest(settings.repository)
    unknown = sorted(set(settings.variants) - {v.key for v in manifest.served_variants()})
    if unknown:
        raise SettingsError(
            f"variants: {unknown} are not served variants of {settings.repository} "
            f"(served: {', '.join(v.key for v in manifest.served_variants())})"
        )
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        b = backend
        if b is None:
            opts = backend_options(settings, worker.count if worker else 1)
            b = make_backend(settings.backend.kind, settings.repository, manifest, **opts)
        await b.start()
        found = (
            LoadedRouter(router_predictor, f"custom: {type(router_predictor).__name__} given to create_app", {})
            if router_predictor is not None
            else load_router(settings.repository, manifest, settings.planner.enabled)
        )
        service = ClassifierService(settings, manifest, b, metrics, router=found.predictor)
        service.router_info = found
        await service.warm_up()
        service.worker = worker
        # the planner's latency estimates, for this host (profiling.py); worker 0 measures for all
        await service.profile_host(worker.profile_path if worker else None, worker.index if worker else 0)
        if settings.memory.enabled and worker is not None and worker.index > 0:
            log.info("memory policy: run by worker 0 only (one policy loads and unloads Triton's models)")
        elif settings.memory.enabled:
            service.memory_controller = MemoryController(
                service, settings.memory, probe=memory_probe, triton_metrics_url=settings.backend.triton_metrics_url
            )
            service.memory_controller.start()
        app.state.service = service
        # everything allocated so far (modules, sessions, the manifest, the router) lives as long
        # as the process: take it out of the cyclic GC's scans, whose full passes over it were
        # pauses every caller in flight waits for
        gc.freeze()
        health = b.variants()
        log.info(
            "serving %s with the %s backend; variants: %s; router: %s%s",
            manifest.model_name,
            b.name,
            ", ".join(f"{k}={'ok' if h.healthy else 'UNHEALTHY'}" for k, h in health.items()),
            found.summary,  # one line each; the structured detail is in /v1/status
            "" if found.predictor is not None else f"; single-stage routing on {service.prior.summary()}",
        )
        if not b.ready():
            log.error("no variant can serve: /readyz answers 503 and classify requests get 503")
        grpc_front = None
        if settings.server.grpc_port:
            grpc_front = GrpcFront(
                service,
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
            app.state.service = None
            if service.memory_controller is not None:
                await service.memory_controller.close()
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
    app.state.grpc = None
    install_error_handlers(app)
    app.include_router(api_router)
    app.include_router(oip_router)
    generate_openapi = app.openapi

    def openapi() -> dict:  # the request schema depends on this service's image size and limits
        schema = generate_openapi()  # cached by FastAPI after the first call
        schema.setdefault("components", {}).setdefault("schemas", {}).update(
            request_schemas(manifest.image_size, settings.limits.max_instances)
        )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    if settings.server.api_key:
        app.api_key = settings.server.api_key.encode()
        app.add_middleware(ApiKeyMiddleware, api_key=settings.server.api_key, on_reject=metrics.unauthorized.inc)
    return app
