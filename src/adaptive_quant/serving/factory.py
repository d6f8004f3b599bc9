"""The service built whole, once the backend has started: router, model, warm-up, host
profiles, memory policy. The app's lifespan calls `build_service` for the serving version; the
roll-out's follower (follower.py) calls `load_version` for every version that becomes live while
the gateway serves, and hands the set to `ClassifierService.set_versions`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from adaptive_quant.core.images import encode_png
from adaptive_quant.core.manifest import Manifest, load_manifest
from adaptive_quant.core.memory_policy import MemorySample
from adaptive_quant.core.versions import index_stamp, load_version_manifest, read_index
from adaptive_quant.serving.backends import make_backend
from adaptive_quant.serving.backends.base import Backend
from adaptive_quant.serving.decode import decode_instances
from adaptive_quant.serving.followup import LoadedRouter, RouterPredictor, load_router
from adaptive_quant.serving.memory_control import MemoryController
from adaptive_quant.serving.metrics import GatewayMetrics
from adaptive_quant.serving.model import ServedModel, build_model, routed_keys, variant_estimator
from adaptive_quant.serving.profiling import ProfileInfo, load_shared, profile_host, save_shared, scaled_profiles
from adaptive_quant.serving.service import ClassifierService
from adaptive_quant.serving.settings import ServeSettings
from adaptive_quant.serving.worker_role import WorkerRole

log = logging.getLogger(__name__)


class VersionLoadError(RuntimeError):
    """A model version cannot serve: a variant that does not load, fails its warm-up call or
    answers non-finite logits, or a router named but unusable (the message says which and why)."""


def backend_options(settings: ServeSettings, workers: int = 1) -> dict[str, Any]:
    """The keyword arguments `make_backend` gets for `settings.backend.kind`: the gateway's, and
    the benchmark's when it times the backend alone (so both run the same batcher settings).
    `workers`: gateway processes sharing this host's cores (instances: auto is divided among them)."""
    if settings.backend.kind == "ray":  # an ingress replica of `aq-serve --engine ray` (serving/ray/)
        return {
            "app_name": settings.ray.app_name,
            "status_interval_s": settings.ray.status_interval_s,
            "max_batch_size": settings.batching.max_batch_size,
            "calls_per_replica": settings.ray.calls_per_replica,
            "variants": list(settings.variants) or None,
        }
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


def serving_manifest(repository: str | Path) -> Manifest:
    """The serving version's manifest: versions.json's, or manifest.json in a repository made
    before versions (read as today, with its error for a folder that is no repository)."""
    if index_stamp(repository) is None:
        return load_manifest(repository)
    return load_version_manifest(repository, read_index(repository).serving)


def profile_file(worker: WorkerRole | None, version: int) -> Path | None:
    """Where worker 0 leaves version N's profiles for the other workers (and a restarted one)."""
    if worker is None:
        return None
    p = worker.profile_path
    return p if version == 1 else p.with_name(f"{p.stem}.v{version}{p.suffix}")


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
    """The gateway's service over a started `backend` of the serving version (`manifest`, whose
    `version` it is; default: the repository's manifest.json). `worker`: this process is one of
    several (workers.py): worker 0 profiles the host for all and runs the memory policy.
    `router_predictor` replaces the manifest's router, `memory_probe` the memory policy's
    measurement (tests)."""
    if manifest is None:
        manifest = load_manifest(settings.repository)
    router = version_router(settings, manifest, router_predictor)
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
    service = ClassifierService(settings, metrics, model, worker=worker, memory_controller=memory)
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
    """The version the gateway starts with, ready to serve: its variants warmed up on `backend`,
    its latency estimates from this host's profiles (profiling.py; with several workers, worker 0
    measures and the others read its file)."""
    keys = routed_keys(settings, manifest)
    speed = speed_router(settings, manifest)
    await warm_up(settings, manifest, backend, keys, router)
    warm_up_router(manifest, speed)
    estimator = variant_estimator(settings, manifest)
    profile = await profile_host(
        backend,
        manifest,
        keys,
        estimator,
        settings.profiling,
        profile_file(worker, manifest.version),
        worker.index if worker else 0,
    )
    return build_model(
        settings,
        manifest,
        router,
        backend=backend,
        version=manifest.version,
        estimator=estimator,
        profile=profile,
        speed_router=speed,
    )


def speed_router(settings: ServeSettings, manifest: Manifest) -> LoadedRouter:
    """The cheap entry's router (the manifest's speed_router). Unusable (missing, damaged): logged as an
    error, and the version serves without the cheap entry; it never stops a version from serving."""
    return load_router(settings.repository, manifest, settings.planner.enabled, role="speed")


def warm_up_router(manifest: Manifest, router: LoadedRouter) -> None:
    """The router's first-call costs (NumPy paths), paid before the first caller."""
    if router.predictor is not None:
        router.predictor.predict(np.zeros((1, len(manifest.classes)), np.float32))


def version_router(settings: ServeSettings, manifest: Manifest, predictor: RouterPredictor | None) -> LoadedRouter:
    """The version's router, or the one the caller put in its place (tests), for every version."""
    if predictor is not None:
        return LoadedRouter(predictor, f"custom: {type(predictor).__name__} given to create_app", {})
    return load_router(settings.repository, manifest, settings.planner.enabled)


async def load_version(
    settings: ServeSettings,
    manifest: Manifest,
    serving: ServedModel,
    worker: WorkerRole | None = None,
    router_predictor: RouterPredictor | None = None,
) -> ServedModel:
    """Version `manifest.version`, loaded while `serving` serves: its own backend started, every
    routed variant checked healthy and warmed up (one call, finite logits of the right shape), its
    router, and its latency profiles. Raises VersionLoadError (its backend closed) when it
    cannot serve: a version loaded now must serve whole, unlike the one the gateway starts with.

    Profiles: nothing is timed under live load. A profile worker 0 left for this version is
    used; else the manifest's, scaled by the serving version's host/manifest ratio per variant
    and batch size (profiling.scaled_profiles), which worker 0 leaves for a restarted worker."""
    workers = worker.count if worker else 1
    keys = routed_keys(settings, manifest)
    options = backend_options(settings, workers)
    if settings.backend.kind == "triton":
        # under live traffic: only the routed variants, one model at a time (each Python-backend stub
        # that starts takes a core for about a second; all at once stalled serving for seconds)
        options |= {"variants": keys, "parallel_loads": False}
    backend = make_backend(settings.backend.kind, settings.repository, manifest, **options)
    try:
        await backend.start()
        served = {v.key for v in manifest.served_variants()}
        missing = [k for k in settings.variants if k not in served]
        if missing or not keys:
            raise VersionLoadError(
                f"it does not serve {', '.join(missing) or 'any variant'}, which this gateway routes to (variants)"
            )
        health = backend.variants()
        sick = [f"{k}: {health[k].detail}" for k in keys if not health[k].healthy]
        if sick:
            raise VersionLoadError("variants cannot serve: " + "; ".join(sick))
        router = version_router(settings, manifest, router_predictor)
        if manifest.router and settings.planner.enabled and router.predictor is None:
            raise VersionLoadError(f"its router cannot be used: {router.summary}")
        await check_warm_up(settings, manifest, backend, keys, router)
        speed = speed_router(settings, manifest)
        warm_up_router(manifest, speed)
        estimator = variant_estimator(settings, manifest)
        shared = profile_file(worker, manifest.version)
        info: ProfileInfo | None = None
        if shared is not None and shared.exists():
            info = load_shared(shared, estimator, worker.index if worker else 0)
        if info is None:
            info = scaled_profiles(manifest, keys, estimator, serving.manifest, serving.profile)
            if shared is not None and worker is not None and worker.index == 0:
                save_shared(shared, info)
        return build_model(
            settings,
            manifest,
            router,
            backend=backend,
            version=manifest.version,
            estimator=estimator,
            profile=info,
            speed_router=speed,
        )
    except BaseException:
        await backend.close()
        raise


async def check_warm_up(
    settings: ServeSettings, manifest: Manifest, backend: Backend, keys: list[str], router: LoadedRouter
) -> None:
    """`warm_up`, strict: each variant's call must answer finite logits of the right shape."""
    size = manifest.image_size
    x = np.zeros((1, 3, size, size), np.float32)  # (1, 3, H, W)
    if router.predictor is not None:
        router.predictor.predict(np.zeros((1, len(manifest.classes)), np.float32))
    for key in keys:
        try:
            logits = await asyncio.wait_for(backend.infer(key, x), settings.deadline.no_budget_timeout_ms / 1e3)
        except Exception as exc:
            raise VersionLoadError(f"warm-up call on {key} failed: {exc!r}") from exc
        if logits.shape != (1, len(manifest.classes)):
            raise VersionLoadError(f"warm-up call on {key} answered logits of shape {logits.shape}")
        if not np.isfinite(logits).all():
            raise VersionLoadError(f"warm-up call on {key} answered non-finite logits")


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
