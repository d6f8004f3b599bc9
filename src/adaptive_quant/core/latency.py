"""Live latency estimate per variant: the manifest's profile, corrected by what we observe.

estimate(v, batch) = ratio(v) · [ service(v, batch) + queue(v) ]          (ms)
  service(v, b) = p95 from the manifest's latency profile at batch b (smallest profiled
                  batch ≥ b), the time one backend call of b samples takes on an idle server
  queue(v)      = work(v) = ceil(q / max_batch) · service(v, min(q, max_batch)): q samples
                  already in flight on v are served first, in full batches, before ours;
                  with compute_slots = N ≥ 1 the variants share N compute slots (the embedded
                  backend's CPU cores, one GPU), so queue(v) = Σ_u work(u) / N: work queued on
                  INT8 delays an FP32 call too. Without it a slow variant with an empty queue
                  looks fast while the fast one is busy. (Under closed-loop load the budget,
                  not the queue estimate, decides most routes: both queue models serve alike.)
                  Variants served as replicas elsewhere (Ray Serve, compute_slots = 0) report
                  their replicas r and the samples queued on them Q (`set_replicas`): q =
                  max(own in flight, Q) is spread over r replicas, each working off q / r.
  ratio(v)      = EWMA of observed / predicted over completed calls: corrects a profile that
                  was measured on another host, or a server that is slower right now.
                  It relaxes back towards 1 with a half-life when nothing is observed, so a
                  variant that looked slow once is tried again later instead of shunned forever.

Pure logic with an injectable clock; the gateway calls `begin`/`end` around backend calls.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from pydantic import ConfigDict, Field

from adaptive_quant.core.manifest import LatencyProfile
from adaptive_quant.core.settings import Section


class LatencyConfig(Section):
    model_config = ConfigDict(frozen=True)
    config_key: ClassVar[str] = "latency"

    ewma_alpha: float = Field(0.2, ge=0.0, le=1.0)  # weight of the newest observation; 0 freezes the profile
    min_ratio: float = Field(0.05, gt=0.0, le=1.0)  # clamps on one observation's observed/predicted ratio, so one
    # hiccup (GC pause, page fault) cannot dominate the estimate. 4, not more: one stall is seen
    # by every request in flight on the variant (64 observations at concurrency 64); at 50 that
    # made INT8 look slower than FP32 for ~6 s and the router moved everything to FP32
    max_ratio: float = Field(4.0, ge=1.0)
    relax_half_life_s: float = Field(30.0, gt=0.0)  # s for the ratio to forget half its deviation from 1
    default_service_ms: float = Field(5.0, gt=0.0)  # ms per call when a variant has no latency profile
    # samples per backend call, as the backend batches them (in the gateway: batching.max_batch_size)
    max_batch_size: int = Field(32, ge=1)
    # variants share this many compute slots (1: one CPU pool or one GPU); 0 = each variant
    # has hardware of its own (independent queues)
    compute_slots: int = Field(1, ge=0)


@dataclass
class _VariantState:
    profile: LatencyProfile | None
    ratio: float = 1.0
    ratio_at: float = 0.0  # clock time of the last update, s
    in_flight: int = 0  # samples dispatched and not yet answered
    observations: int = 0
    replicas: int = 1  # replicas serving the variant (a backend of replicas reports them)
    remote_queued: int = 0  # samples queued on those replicas by every caller, as last reported


class LatencyEstimator:
    """Tracks every served variant; not thread-safe (the gateway uses it from its event loop)."""

    def __init__(
        self,
        profiles: Mapping[str, LatencyProfile | None],
        config: LatencyConfig = LatencyConfig(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._clock = clock
        self._state = {k: _VariantState(profile=p, ratio_at=clock()) for k, p in profiles.items()}
        self._service_cache: dict[tuple[str, int, str], float] = {}  # (variant, batch, point) → ms
        # bumped whenever the profiles change: callers caching figures derived from service_ms
        # (the follow-up stage's relative plan costs) key their caches on it
        self.profile_version = 0

    def set_profiles(self, profiles: Mapping[str, LatencyProfile]) -> None:
        """Replace the profiles of these variants (measured on this host at start-up)."""
        for key, profile in profiles.items():
            self._state[key].profile = profile
        self._service_cache.clear()
        self.profile_version += 1

    @property
    def variants(self) -> list[str]:
        return list(self._state)

    def service_ms(self, variant: str, batch: int) -> float:
        """Profiled p95 time of one call of `batch` samples on an idle server, ms."""
        return self._profiled_ms(variant, batch, "p95_ms")

    def compute_ms(self, variant: str, batch: int) -> float:
        """Profiled p50 time of one call of `batch` samples, ms: what a call costs in compute.

        The planner prices follow-ups with this, relative to the entry's, and plans deadlines with
        the p95 (`service_ms`). A profile taken while other work shared the cores has its p95
        inflated for every variant alike, which compresses their cost ratios, and balanced routing
        then bought the three-pass plan where one flip pays. The p50 keeps the ratio."""
        return self._profiled_ms(variant, batch, "p50_ms")

    def _profiled_ms(self, variant: str, batch: int, point: str) -> float:
        """The profile's `point` ("p50_ms", "p95_ms") at the smallest profiled batch ≥ `batch`, ms;
        `default_service_ms` for a variant without a profile. Cached: profiles change only through
        `set_profiles`, which clears the cache."""
        key = (variant, batch, point)
        cached = self._service_cache.get(key)
        if cached is not None:
            return cached
        profile = self._state[variant].profile
        if profile is None or not profile.batches:
            value = self.config.default_service_ms
        else:
            value = float(getattr(profile.at(max(1, batch)), point))
        self._service_cache[key] = value
        return value

    def set_replicas(self, variant: str, replicas: int, queued: int) -> None:
        """A backend of replicas (Ray Serve) reports `variant`'s running replicas and the samples
        queued on them by every caller (other gateway replicas too), so the queue estimate sees
        load this gateway did not send, and divides it among the replicas."""
        st = self._state.get(variant)
        if st is not None:
            st.replicas = max(1, replicas)
            st.remote_queued = max(0, queued)

    def work_ms(self, variant: str) -> float:
        """Time the samples already in flight on `variant` will keep it busy, ms (per replica,
        where it has several)."""
        st = self._state[variant]
        q = max(st.in_flight, st.remote_queued)
        if st.replicas > 1:
            q = math.ceil(q / st.replicas)
        if q <= 0:
            return 0.0
        mb = self.config.max_batch_size
        return math.ceil(q / mb) * self.service_ms(variant, min(q, mb))

    def queue_ms(self, variant: str) -> float:
        """Time a new call to `variant` waits for work already in flight, ms."""
        slots = self.config.compute_slots
        if slots == 0:
            return self.work_ms(variant)
        return sum(self.work_ms(v) for v in self._state) / slots

    def ratio(self, variant: str) -> float:
        """Current observed/predicted correction, relaxed towards 1 by the time since last update."""
        return self._relaxed(self._state[variant], self._clock())

    def _relaxed(self, st: _VariantState, now: float) -> float:
        """`st`'s ratio at clock time `now`, its deviation from 1 halved every relax_half_life_s."""
        if st.ratio == 1.0:
            return 1.0
        age = max(0.0, now - st.ratio_at)
        return 1.0 + (st.ratio - 1.0) * 0.5 ** (age / self.config.relax_half_life_s)

    def predicted_ms(self, variant: str, batch: int) -> float:
        """Uncorrected model: service + queueing, ms."""
        return self.service_ms(variant, batch) + self.queue_ms(variant)

    def estimate_ms(self, variant: str, batch: int) -> float:
        """Latency a call of `batch` samples sent now to `variant` should see, ms."""
        return self.ratio(variant) * self.predicted_ms(variant, batch)

    def estimates_ms(self, variants: list[str], batch: int) -> list[float]:
        """`estimate_ms` of each variant, the shared queue and the clock read once (the one-image
        routing path calls this per request: 9 queue sums for 3 variants cost ~10 µs)."""
        cfg = self.config
        now = self._clock()
        shared = None
        if cfg.compute_slots:
            shared = sum(self.work_ms(v) for v in self._state) / cfg.compute_slots
        return [
            self._relaxed(self._state[v], now)
            * (self.service_ms(v, batch) + (self.work_ms(v) if shared is None else shared))
            for v in variants
        ]

    def load(self) -> float:
        """Samples in flight on every variant, in max-size batches (0 = idle)."""
        return sum(st.in_flight for st in self._state.values()) / self.config.max_batch_size

    def in_flight(self, variant: str) -> int:
        return self._state[variant].in_flight

    def begin(self, variant: str, batch: int) -> float:
        """Register a dispatched call; returns the uncorrected prediction to pass to `end`, ms."""
        predicted = self.predicted_ms(variant, batch)
        self._state[variant].in_flight += batch
        return predicted

    def end(self, variant: str, batch: int, observed_ms: float | None, predicted_ms: float) -> None:
        """Register a finished call; `observed_ms` None = failed (no latency information)."""
        st = self._state[variant]
        st.in_flight = max(0, st.in_flight - batch)
        if observed_ms is None or predicted_ms <= 0:
            return
        self.observe(variant, observed_ms / predicted_ms)

    def observe(self, variant: str, ratio_sample: float) -> None:
        """Fold one observed/predicted ratio into the EWMA."""
        cfg = self.config
        st = self._state[variant]
        sample = min(cfg.max_ratio, max(cfg.min_ratio, ratio_sample))
        current = self.ratio(variant)  # the relaxed value is the one the new sample updates
        st.ratio = (1.0 - cfg.ewma_alpha) * current + cfg.ewma_alpha * sample
        st.ratio_at = self._clock()
        st.observations += 1

    def snapshot(self, variant: str) -> dict[str, float | int]:
        """For /v1/status: what the estimator believes about `variant` now."""
        st = self._state[variant]
        return {
            "estimate_ms_batch1": round(self.estimate_ms(variant, 1), 4),
            "profile_p95_ms_batch1": round(self.service_ms(variant, 1), 4),
            "observed_ratio": round(self.ratio(variant), 4),
            "observations": st.observations,
            "in_flight_samples": st.in_flight,
            "replicas": st.replicas,
            "replica_queued_samples": st.remote_queued,
        }
