"""The service built whole, once the backend has started: router, model, warm-up, host
profiles, memory policy. The app's lifespan calls `build_service`; a roll-out (a later issue)
calls `load_model` for the next version and hands it to `ClassifierService.set_model`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable

import numpy as np

from adaptive_quant.core.images import encode_png
from adaptive_quant.core.manifest import Manifest, load_manifest
from adaptive_quant.core.memory_policy import MemorySample
from adaptive_quant.serving.backends.base import Backend
from adaptive_quant.serving.decode import decode_instances
from adaptive_quant.serving.followup import LoadedRouter, RouterPredictor, load_router
from adaptive_quant.serving.memory_control import MemoryController
from adaptive_quant.serving.metrics import GatewayMetrics
from adaptive_quant.serving.model import ServedModel, build_model, routed_keys, variant_estimator
from adaptive_quant.serving.profiling import profile_host
from adaptive_quant.serving.service import ClassifierService
from adaptive_quant.serving.settings import ServeSettings
from adaptive_quant.serving.worker_role import WorkerRole

log = logging.getLogger(__name__)


async def build_service(
    settings: ServeSettings,
    backend: Backend,
    metrics: GatewayMetrics,
    *,
    worker: WorkerRole | None = None,
    router_predictor: RouterPredictor | None = None,
    memory_probe: Callable[[], MemorySample] | None = None,
    manifest: Manifest | None = None,
) -> ClassifierService:
    """The gateway's service over a started `backend`. `worker`: this process is one of several
    (workers.py): worker 0 profiles the host for all and runs the memory policy.
    `router_predictor` replaces the manifest's router, `memory_probe` the memory policy's
    measurement (tests); `manifest`: the repository's, when the caller has read it already."""
    if manifest is None:
        manifest = load_manifest(settings.repository)
    router = (
        LoadedRouter(router_predictor, f"custom: {type(router_predictor).__name__} given to create_app", {})
        if router_predictor is not None
        else load_router(settings.repository, manifest, settings.planner.enabled)
    )
    model = await load_model(settings, manifest, backend, router, worker)
    memory = None
    if settings.memory.enabled and worker is not None and worker.index > 0:
        log.info("memory policy: run by worker 0 only (one policy loads and unloads Triton's models)")
    elif settings.memory.enabled:
        memory = MemoryController(
            backend,
            metrics,
            settings.memory,
            probe=memory_probe,
            triton_metrics_url=settings.backend.triton_metrics_url,
        )
    service = ClassifierService(settings, backend, metrics, model, worker=worker, memory_controller=memory)
    if memory is not None:
        memory.start(lambda: service.model)  # the version served now, whichever that is
    return service


async def load_model(
    settings: ServeSettings,
    manifest: Manifest,
    backend: Backend,
    router: LoadedRouter,
    worker: WorkerRole | None = None,
) -> ServedModel:
    """One model version, ready to serve: its variants warmed up on `backend`, its latency
    estimates from this host's profiles (profiling.py; with several workers, worker 0 measures
    and the others read its file)."""
    keys = routed_keys(settings, manifest)
    await warm_up(settings, manifest, backend, keys, router)
    estimator = variant_estimator(settings, manifest)
    profile = await profile_host(
        backend,
        manifest,
        keys,
        estimator,
        settings.profiling,
        worker.profile_path if worker else None,
        worker.index if worker else 0,
    )
    return build_model(settings, manifest, router, estimator=estimator, profile=profile)


async def warm_up(
    settings: ServeSettings, manifest: Manifest, backend: Backend, keys: list[str], router: LoadedRouter
) -> None:
    """One request's worth of work before serving, so the first caller does not pay for lazy
    initialisation (image decoder plugins, router, first ORT runs with this shape path).
    Touches neither metrics nor a latency estimate."""
    size = manifest.image_size
    png = base64.b64encode(encode_png(np.zeros((size, size, 3), np.uint8))).decode()
    decode_instances({"instances": [{"b64": png}]}, 1, size)
    x = np.zeros((1, 3, size, size), np.float32)  # (1, 3, H, W)
    if router.predictor is not None:  # the router and planner: first-call costs of NumPy paths
        router.predictor.predict(np.zeros((1, len(manifest.classes)), np.float32))
    health = backend.variants()
    for key in keys:
        if health[key].healthy:
            try:
                await asyncio.wait_for(backend.infer(key, x), settings.deadline.no_budget_timeout_ms / 1e3)
            except Exception as exc:  # a variant failing here will fail (and fall back) for callers too
                log.warning("warm-up call on %s failed: %s", key, exc)
