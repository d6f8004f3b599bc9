"""Latency profiles measured on the host that serves, at start-up.

The manifest's profiles were measured where the repository was exported (e.g. an AMD EPYC),
and the planner prices follow-ups and checks budgets with them. On another CPU they can be
wrong by a large factor (another core, cache or instruction set). So at start-up, when the manifest's host differs from this one (`auto`) or
always (`always`), each served variant is timed through the backend itself, the path requests
take, at the profile's batch sizes, within a time budget (default 2 s, all variants together),
and the estimator plans with what was measured. /v1/status says which profile is in use and why.

With several gateway processes (serving/workers.py) only the first worker measures: the others
start after it and plan with what it wrote (`save_shared` / `load_shared`), because two
profilers timing at once on the same cores would each time the other's load
(`profile_host` does both).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from adaptive_quant.core.host import describe_host, host_differences
from adaptive_quant.core.latency import LatencyEstimator
from adaptive_quant.core.manifest import LatencyPoint, LatencyProfile, Manifest, batch_key_at_or_above
from adaptive_quant.core.settings import Section
from adaptive_quant.core.stats import percentiles
from adaptive_quant.serving.backends.base import Backend

log = logging.getLogger(__name__)

DEFAULT_BATCHES = (1, 8, 32)  # when the manifest has no profile to take batch sizes from


class ProfilingSettings(Section):
    config_key: ClassVar[str] = "profiling"

    # auto: re-profile when the manifest's profile was measured on another host (CPU model,
    # core count, ONNX Runtime version or provider differ); always; never (trust the manifest)
    mode: Literal["auto", "always", "never"] = "auto"
    budget_s: float = Field(2.0, gt=0, le=60)  # s of timing at start-up, all variants together
    min_calls: int = Field(3, ge=1)  # timed calls per batch size at least (the budget may stretch)


@dataclass
class ProfileInfo:
    """What /v1/status reports about the profiles in use."""

    source: str  # "manifest" or "measured at start-up"
    reason: str
    host: dict[str, Any]  # the host the profiles in use were measured on
    seconds: float = 0.0  # s the start-up profiling took
    batch1_p95_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # key → {manifest, used}
    # the profiles measured (key → profile), for the other workers; not part of /v1/status
    measured: dict[str, LatencyProfile] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "measured"}


def save_shared(path: Path, info: ProfileInfo) -> None:
    """Write what the first worker decided and measured, for the workers that start after it
    (written aside and renamed, so a reader never sees half a file)."""
    body = {"info": info.to_json(), "measured": {k: asdict(p) for k, p in info.measured.items()}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body))
    tmp.replace(path)


def load_shared(path: Path, estimator: LatencyEstimator, worker: int) -> ProfileInfo | None:
    """Plan with the first worker's profiles (see save_shared); None when there is no usable file
    (the caller then profiles on its own)."""
    try:
        body = json.loads(path.read_text())
        measured = {
            k: LatencyProfile(host=p["host"], batches={b: LatencyPoint(**q) for b, q in p["batches"].items()})
            for k, p in body["measured"].items()
        }
        info = ProfileInfo(**body["info"], measured=measured)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("latency profiles: worker 0's file %s is unusable (%s); profiling here", path, exc)
        return None
    if measured:
        estimator.set_profiles(measured)
        info.reason += f" (measured by worker 0; worker {worker} plans with its figures)"
    log.info("latency profiles: %s, as worker 0 found (%s)", info.source, path)
    return info


async def profile_host(
    backend: Backend,
    manifest: Manifest,
    keys: list[str],
    estimator: LatencyEstimator,
    settings: ProfilingSettings,
    shared: Path | None = None,
    worker: int = 0,
) -> ProfileInfo:
    """The profiles this gateway plans with, handed to `estimator`: re-measured here when the
    manifest's come from another host (profile_on_host). With several workers (`shared` set) the
    first to start (worker 0) measures and writes `shared`, the others plan with it; a worker
    restarted later finds the file too, and does not time the host under load."""
    info = load_shared(shared, estimator, worker) if shared is not None and shared.exists() else None
    if info is None:
        info = await profile_on_host(backend, manifest, keys, estimator, settings)
        if shared is not None:
            save_shared(shared, info)
    return info


def should_profile(manifest: Manifest, keys: list[str], here: dict[str, Any], mode: str) -> tuple[bool, str]:
    if mode == "never":
        return False, "profiling.mode is never: the manifest's profiles are used as they are"
    if mode == "always":
        return True, "profiling.mode is always"
    diffs: list[str] = []
    for key in keys:
        profile = manifest.variants[key].latency
        d = host_differences(profile.host if profile else None, here)
        if d:
            diffs = d
            break
    if not diffs:
        return False, "the manifest's profiles were measured on this kind of host"
    return True, "the manifest's profiles come from another host (" + "; ".join(diffs) + ")"


async def profile_on_host(
    backend: Backend, manifest: Manifest, keys: list[str], estimator: LatencyEstimator, settings: ProfilingSettings
) -> ProfileInfo:
    """Decide (should_profile), measure, hand the profiles to `estimator`, log; what is in use."""
    here = describe_host(_ort_version(), getattr(backend, "intra_op_threads", 0))
    first = next((manifest.variants[k].latency for k in keys if manifest.variants[k].latency), None)
    manifest_host = first.host if first else {}
    do, reason = should_profile(manifest, keys, here, settings.mode)
    if not do:
        log.info("latency profiles: from the manifest (%s)", reason)
        return ProfileInfo("manifest", reason, manifest_host)
    manifest_p95 = {k: estimator.service_ms(k, 1) for k in keys}
    t = time.perf_counter()
    try:
        measured = await measure_profiles(backend, manifest, keys, settings, here)
    except Exception as exc:  # a variant failing here fails for callers too: plan with the manifest
        log.warning("latency profiles: re-profiling failed (%s); planning with the manifest's", exc)
        return ProfileInfo("manifest", f"{reason}, but profiling failed: {exc}", manifest_host)
    seconds = time.perf_counter() - t
    estimator.set_profiles(measured)
    used = {k: estimator.service_ms(k, 1) for k in keys}
    log.info(
        "latency profiles: %s; measured %s on %s in %.1f s; batch-1 p95 %s",
        reason,
        ", ".join(measured),
        here.get("cpu"),
        seconds,
        ", ".join(f"{k} {manifest_p95[k]:.2f} → {used[k]:.2f} ms" for k in measured),
    )
    return ProfileInfo(
        "measured at start-up",
        reason,
        here,
        round(seconds, 3),
        {k: {"manifest": round(manifest_p95[k], 4), "used": round(used[k], 4)} for k in keys},
        measured,
    )


async def measure_profiles(
    backend: Backend, manifest: Manifest, keys: list[str], settings: ProfilingSettings, host: dict[str, Any]
) -> dict[str, LatencyProfile]:
    """Time every healthy variant in `keys` through `backend` at its profile's batch sizes;
    the profiles carry `host` (where they were measured)."""
    health = backend.variants()
    keys = [k for k in keys if health[k].healthy]
    wanted: dict[str, list[int]] = {}
    for key in keys:
        profile = manifest.variants[key].latency
        wanted[key] = sorted(int(b) for b in profile.batches) if profile and profile.batches else list(DEFAULT_BATCHES)
    sizes = sorted({b for bs in wanted.values() for b in bs})
    share = settings.budget_s / max(1, len(sizes))  # s per batch size, every variant together
    image = manifest.image_size
    points: dict[str, dict[str, LatencyPoint]] = {k: {} for k in keys}
    for batch in sizes:
        group = [k for k in keys if batch in wanted[k]]
        x = np.zeros((batch, 3, image, image), np.float32)
        for key in group:
            await backend.infer(key, x)  # the first call of a shape pays for allocation
        # round-robin, one call per variant per round: whatever else runs on the machine
        # meanwhile slows every variant alike, so their order and ratios survive it
        times: dict[str, list[float]] = {k: [] for k in group}
        start = time.perf_counter()
        rounds = 0
        while rounds < settings.min_calls or (time.perf_counter() - start < share and rounds < 200):
            for key in group:
                t = time.perf_counter()
                await backend.infer(key, x)
                times[key].append((time.perf_counter() - t) * 1e3)
            rounds += 1
            await asyncio.sleep(0)  # requests that arrive meanwhile are not starved
        for key in group:
            q = percentiles(times[key])
            mean_s = float(np.mean(times[key])) / 1e3
            points[key][str(batch)] = LatencyPoint(p50_ms=q["p50"], p95_ms=q["p95"], throughput=batch / mean_s)
    return {k: LatencyProfile(host=host, batches=points[k]) for k in keys}


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:  # a Triton-only gateway: the server's runtime is not ours to name
        return "unknown"


def scaled_profiles(
    manifest: Manifest,
    keys: list[str],
    estimator: LatencyEstimator,
    base_manifest: Manifest,
    base: ProfileInfo,
) -> ProfileInfo:
    """The profiles of a version loaded while another serves, handed to `estimator`, without
    timing anything: timing under live load would time the load (and slow it). This host's
    figures for the new version are its manifest's, scaled per variant key and batch size by
    what this host measured for the serving version against the serving version's manifest
    (`base`, `base_manifest`): the same networks on the same host keep their ratio. A key the
    serving version lacks takes the median ratio of the others. When the serving version plans
    with its manifest's profiles (nothing measured here), so does the new one."""
    if not base.measured:
        reason = "loaded while serving: its manifest's profiles, as the serving version plans with its own"
        first = next((manifest.variants[k].latency for k in keys if manifest.variants[k].latency), None)
        return ProfileInfo("manifest", reason, first.host if first else {})
    ratios: dict[str, dict[str, tuple[float, float]]] = {}  # key → batch → (p50, p95) host/manifest
    for key, measured in base.measured.items():
        old = base_manifest.variants.get(key)
        if old is None or old.latency is None or not old.latency.batches:
            continue
        ratios[key] = {
            b: (
                p.p50_ms / max(old.latency.at(int(b)).p50_ms, 1e-9),
                p.p95_ms / max(old.latency.at(int(b)).p95_ms, 1e-9),
            )
            for b, p in measured.batches.items()
        }
    overall = [r for per in ratios.values() for r in per.values()]
    fallback = (
        (float(np.median([r[0] for r in overall])), float(np.median([r[1] for r in overall])))
        if overall
        else (1.0, 1.0)
    )
    host = next(iter(base.measured.values())).host
    scaled: dict[str, LatencyProfile] = {}
    before = {k: estimator.service_ms(k, 1) for k in keys}
    for key in keys:
        profile = manifest.variants[key].latency
        if profile is None or not profile.batches:
            continue
        per = ratios.get(key)
        points = {}
        for b, p in profile.batches.items():
            r50, r95 = per[batch_key_at_or_above(per, int(b))] if per else fallback
            points[b] = LatencyPoint(p50_ms=p.p50_ms * r50, p95_ms=p.p95_ms * r95, throughput=p.throughput / r50)
        scaled[key] = LatencyProfile(host=host, batches=points)
    estimator.set_profiles(scaled)
    reason = (
        "loaded while serving: its manifest's profiles scaled by the serving version's host/manifest ratio "
        "per variant and batch size (not timed under live load)"
    )
    return ProfileInfo(
        "scaled from the serving version's",
        reason,
        host,
        0.0,
        {k: {"manifest": round(before[k], 4), "used": round(estimator.service_ms(k, 1), 4)} for k in keys},
        scaled,
    )
