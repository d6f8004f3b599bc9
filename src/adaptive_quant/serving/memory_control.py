"""The memory-pressure controller: measures memory, asks memory_policy.decide, applies it through the backend.

Runs as one asyncio task in the gateway (started by factory.build_service when `memory.enabled`).
Measurements, every `memory.interval_s`:
  system  – host memory in use, % (psutil; in a container: the container's view of the host)
  process – this gateway process's RSS, % of host memory
  server  – Triton's own report from its /metrics (`backend.triton_metrics_url`): GPU memory in
            use when it has GPUs (the memory that limits how many variants fit), else host memory
Usage per variant is the count of samples the router sent it, decayed with a half-life, so a
variant nobody has asked for lately is the first to go.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import psutil
from prometheus_client import Gauge

from adaptive_quant.core.memory_policy import Decision, MemoryPolicyConfig, MemorySample, VariantFacts, decide
from adaptive_quant.core.precision import Precision
from adaptive_quant.serving.backends.base import Backend
from adaptive_quant.serving.metrics import GatewayMetrics

if TYPE_CHECKING:
    from adaptive_quant.serving.model import ServedModel

log = logging.getLogger(__name__)


def parse_triton_memory(text: str) -> float | None:
    """% of memory in use from Triton's Prometheus text: max over GPUs, else host (CPU) memory; None if absent."""
    used: dict[str, float] = {}
    total: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        for prefix in ("nv_gpu_memory", "nv_cpu_memory"):
            kind = "gpu" if prefix == "nv_gpu_memory" else "cpu"
            if name == f"{prefix}_used_bytes":
                used[f"{kind}{labels}"] = float(value)
            elif name == f"{prefix}_total_bytes":
                total[f"{kind}{labels}"] = float(value)
    pcts = {k: 100.0 * used[k] / total[k] for k in used if total.get(k)}
    gpu = [v for k, v in pcts.items() if k.startswith("gpu")]
    cpu = [v for k, v in pcts.items() if k.startswith("cpu")]
    return max(gpu) if gpu else (max(cpu) if cpu else None)


def measure(triton_metrics_url: str = "", timeout_s: float = 1.0) -> MemorySample:
    """One blocking measurement (the controller runs it in a thread)."""
    total = psutil.virtual_memory()
    process_pct = 100.0 * psutil.Process().memory_info().rss / total.total
    server = None
    if triton_metrics_url:
        try:
            with urllib.request.urlopen(triton_metrics_url, timeout=timeout_s) as r:
                server = parse_triton_memory(r.read().decode("utf-8", "replace"))
        except OSError as exc:  # Triton down: the health monitor reports that; memory is just unknown
            log.debug("Triton metrics unavailable: %s", exc)
    return MemorySample(system_pct=total.percent, process_pct=process_pct, server_pct=server)


class MemoryController:
    """Applies the memory policy to the variants of the served model, through a backend that
    supports model control (else it only observes)."""

    def __init__(
        self,
        backend: Backend,
        metrics: GatewayMetrics,
        config: MemoryPolicyConfig,
        probe: Callable[[], MemorySample] | None = None,  # tests inject a fake measurement
        triton_metrics_url: str = "",
    ) -> None:
        self._backend = backend
        self.metrics = metrics
        self.config = config
        self.probe = probe or (lambda: measure(triton_metrics_url))
        self._model: Callable[[], ServedModel] | None = None  # the version served now (start())
        self.unloaded_by_policy: set[str] = set()
        self.usage: dict[str, float] = {}  # decayed routed-sample counts
        self._seen: dict[str, float] = {}  # last cumulative routed count
        self._last_update = time.monotonic()
        self._last_action = float("-inf")  # time.monotonic() of the last load/unload, s
        self.last_sample: MemorySample | None = None
        self.last_decision: Decision | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=20)  # the latest actions, newest last
        self._task: asyncio.Task | None = None
        self.loaded_gauge = Gauge(
            "aq_variant_loaded",
            "1 when the variant's model is loaded and serving, else 0",
            ["variant"],
            registry=metrics.registry,
            multiprocess_mode="livemax",  # several workers: only worker 0 runs the policy (workers.py)
        )

    @property
    def backend(self) -> Backend:
        """The serving version's backend (a roll-out changes it), or the one given before start()."""
        return self._model().backend if self._model is not None else self._backend

    # ------------------------------------------------------------------ lifecycle

    def start(self, model: Callable[[], ServedModel]) -> None:
        """Run the policy every `interval_s` over the variants of `model()`, the version served now."""
        self._model = model
        self.usage = dict.fromkeys(model().keys, 0.0)
        self._seen = dict.fromkeys(model().keys, 0.0)
        if not getattr(self.backend, "supports_model_control", False):
            log.warning(
                "memory policy enabled, but the %s backend cannot load/unload models "
                "(needs backend.kind=triton and backend.model_control=explicit): it only observes",
                self.backend.name,
            )
        self._task = asyncio.create_task(self._run(), name="memory-policy")

    def _keys(self) -> list[str]:
        assert self._model is not None, "start() first"
        return self._model().keys

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - it was told to stop
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the controller die: log and keep going
                log.exception("memory policy step failed")
            await asyncio.sleep(self.config.interval_s)

    # ------------------------------------------------------------------ one step

    def _update_usage(self) -> None:
        now = time.monotonic()
        decay = math.pow(0.5, (now - self._last_update) / self.config.usage_half_life_s)
        self._last_update = now
        for k in self._keys():
            total = self.metrics.value("aq_samples_routed_total", variant=k)
            self.usage[k] = self.usage.get(k, 0.0) * decay + (total - self._seen.get(k, 0.0))
            self._seen[k] = total

    def facts(self) -> list[VariantFacts]:
        states = getattr(self.backend, "model_states", lambda: {})()
        health = self.backend.variants()
        assert self._model is not None, "start() first"
        model = self._model()
        out = []
        for k in model.keys:
            v = model.manifest.variants[k]
            loaded = states[k]["loaded"] if k in states else health[k].healthy
            out.append(
                VariantFacts(
                    key=k,
                    rank=Precision(v.precision).rank,
                    accuracy=v.val_accuracy,
                    latency_ms=v.latency.at(1).p95_ms if v.latency else None,
                    size_bytes=v.size_bytes,
                    usage=self.usage.get(k, 0.0),
                    loaded=loaded,
                    unloaded_by_policy=k in self.unloaded_by_policy,
                )
            )
        return out

    async def step(self) -> Decision:
        """Measure, decide, act (at most one load or unload)."""
        sample = await asyncio.to_thread(self.probe)
        self._update_usage()
        decision = decide(sample, self.facts(), self.config, time.monotonic() - self._last_action)
        self.last_sample, self.last_decision = sample, decision
        can_act = getattr(self.backend, "supports_model_control", False)
        if decision.action != "hold" and can_act:
            self._last_action = time.monotonic()
            key = decision.variant
            assert key is not None
            log.warning("memory policy: %s %s: %s", decision.action, key, decision.reason)
            if decision.action == "unload":
                self.unloaded_by_policy.add(key)
                await self.backend.unload_variant(key, f"memory policy: {decision.reason}")
            else:
                health = await self.backend.load_variant(key, f"memory policy: {decision.reason}")
                if health.healthy:
                    self.unloaded_by_policy.discard(key)
                else:
                    log.warning("memory policy could not load %s back: %s", key, health.detail)
            self.history.append(
                {"at": round(time.time(), 3), "action": decision.action, "variant": key, "reason": decision.reason}
            )
        health = self.backend.variants()
        for k in self._keys():
            self.loaded_gauge.labels(k).set(1.0 if health[k].healthy else 0.0)
        return decision

    def snapshot(self) -> dict[str, Any]:
        """The policy's state for /v1/status."""
        c = self.config
        return {
            "enabled": True,
            "acts": bool(getattr(self.backend, "supports_model_control", False)),
            "thresholds_pct": {
                n: {"high": getattr(c, f"{n}_high_pct"), "low": getattr(c, f"{n}_low_pct")}
                for n in ("system", "process", "server")
            },
            "min_loaded": c.min_loaded,
            "last_sample_pct": asdict(self.last_sample) if self.last_sample else None,
            "last_decision": asdict(self.last_decision) if self.last_decision else None,
            "unloaded_by_policy": sorted(self.unloaded_by_policy),
            "recent_usage": {k: round(v, 2) for k, v in self.usage.items()},
            "history": list(self.history),
        }
