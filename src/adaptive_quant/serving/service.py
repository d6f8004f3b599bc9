"""The classify engine: route every sample, call the backend per variant, enforce the deadline, fall back.

Two-stage routing (when the manifest names a router, i.e. the exporter measured follow-up plans):
  1. entry pass: every sample goes to the cheapest allowed variant that can serve (INT8 unless
     X-Min-Precision says otherwise), with the fallback and deadline rules below
  2. serving.followup: the router predictor reads the entry logits, the planner picks a follow-up
     plan per sample within the remaining budget (priced higher under load), the follow-up passes
     run batched and are cut at the deadline; the answer averages the passes that ran
Without a router (older repositories, or planner.enabled false) the single-stage policy below
routes each sample once, on each variant's validation accuracy (core.prior): the same for every
sample, so a request's samples go to one variant unless a fallback moves some.

Per request (single stage, and the entry pass of two-stage):
  1. p(correct | variant) is the manifest's prior, (N, V) (two-stage entry pass: equal for all
     variants, so the cheapest allowed one answers); the estimator gives each variant's latency
     for a call of N samples now (profile · observed ratio + queueing)
  2. `route_batch` picks a variant per sample (the same function the offline evaluation uses)
  3. samples of one variant go in one backend call; variants run in parallel (asyncio.gather)
  4. each call is abandoned at max(remaining budget, slow_factor × its own estimate) + grace:
     when the estimate already exceeds the budget the budget is lost anyway, and cutting the
     call at the budget would only turn a late answer into a later one elsewhere (measured at
     concurrency 64, 40 s, budget 110 ms: slow_factor 2 → 2.8 % of requests fell back, p99
     287 ms; 4 → 0.5 %, p99 172 ms; never cut → 0 %, p99 161 ms; 4 still cuts a stuck variant
     early). A call with no variant left to fall back to is never cut by the budget (only by
     deadline.no_budget_timeout_ms): under overload a late answer beats a 503
  5. a call that fails or times out is re-routed among the variants not yet tried for these
     samples; when none is left the request fails with ServiceUnavailable (503)
  6. only errors count towards a variant's breaker, not timeouts: a timeout under overload
     says "busy", which the latency estimate already learns from; tripping the breaker on it
     would take the busiest variant out and pile its load on the others (measured: at
     concurrency 64 that turned overload into 25 % 503s)
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from adaptive_quant.core.images import encode_png
from adaptive_quant.core.latency import LatencyEstimator
from adaptive_quant.core.manifest import Manifest
from adaptive_quant.core.precision import Precision
from adaptive_quant.core.prior import PriorAccuracy
from adaptive_quant.core.routing import NoVariantAllowed, Priority, route_batch
from adaptive_quant.core.stats import softmax
from adaptive_quant.serving.backends.base import Backend
from adaptive_quant.serving.decode import decode_instances
from adaptive_quant.serving.errors import InputError, ServiceUnavailable
from adaptive_quant.serving.followup import (
    FollowupStage,
    LoadedRouter,
    RouterPredictor,
    highest_precision,
)
from adaptive_quant.serving.metrics import GatewayMetrics
from adaptive_quant.serving.options import ClassifyOptions
from adaptive_quant.serving.profiling import ProfileInfo, load_shared, profile_on_host, save_shared
from adaptive_quant.serving.settings import ServeSettings
from adaptive_quant.serving.workers import WorkerRole

log = logging.getLogger(__name__)

FALLBACK_LOG_INTERVAL_S = 5.0  # s between fallback warnings for one variant and reason


@dataclass
class ClassifyResult:
    probs: np.ndarray  # (N, num_classes) float32: softmax of the answer (averaged over the passes that ran)
    variants: list[str]  # (N,) key of the variant that answered each sample's entry pass
    passes: list[list[str]]  # (N,) the passes that answered each sample, entry first ("int8", "int8:hflip")
    precisions: list[str]  # (N,) the highest precision among each sample's passes
    budget_met: bool
    server_time_ms: float
    routing_time_ms: float
    fallbacks: int
    followups: int = 0  # samples that got at least one follow-up pass answered
    followups_lost: int = 0  # follow-up passes cut at the deadline or failed


@dataclass
class _Breaker:
    """Consecutive failures of one variant; open = left out of routing until `open_until`."""

    failures: int = 0
    open_until: float = 0.0  # time.monotonic() s
    total_failures: int = 0


@dataclass
class _RequestState:
    x: np.ndarray  # (N, 3, H, W) float32 model input
    acc: np.ndarray  # (N, V) predicted accuracy
    options: ClassifyOptions
    started: float  # perf_counter() s at arrival
    logits: np.ndarray  # (N, C) filled as variants answer
    answered_by: np.ndarray  # (N,) column of the variant that answered, -1 = not yet
    decision_met: np.ndarray  # (N,) bool: the router's estimate fitted the budget
    routing_s: float = 0.0
    fallbacks: int = 0
    errors: list[str] = field(default_factory=list)


class ClassifierService:
    """Holds the manifest, backend, routing inputs (prior, router), latency estimator, breakers and metrics."""

    def __init__(
        self,
        settings: ServeSettings,
        manifest: Manifest,
        backend: Backend,
        metrics: GatewayMetrics,
        router: RouterPredictor | None = None,
    ) -> None:
        self.settings = settings
        self.manifest = manifest
        self.backend = backend
        # an idle backend may compute on the event loop only while this is the one request in flight
        backend.set_contention_probe(lambda: self.in_flight > 1)
        self.prior = PriorAccuracy.from_manifest(manifest)  # single-stage routing's p(correct | variant)
        self.metrics = metrics
        # pinned to a subset (benchmarks, a variant taken out by config, an opt-in variant such as
        # a pruned INT8 network taken in), else every served variant but the opt-in ones
        served = manifest.routed_variants(settings.variants)
        self.keys = [v.key for v in served]  # column order everywhere below
        self.prior_row = self.prior.row(self.keys)  # (V,) single-stage p(correct), the same for every sample
        self.precisions = [Precision(v.precision) for v in served]
        self.ranks = np.array([p.rank for p in self.precisions])  # (V,)
        self.precision_of = dict(zip(self.keys, self.precisions))
        self.estimator = LatencyEstimator({v.key: v.latency for v in served}, settings.latency)
        self._order_entry()
        self.profile_info = ProfileInfo("manifest", "not profiled yet", {})
        self.worker: WorkerRole | None = None  # one of several gateway processes (serving/workers.py)
        self.breakers = {k: _Breaker() for k in self.keys}
        self.started_at = time.monotonic()
        self.in_flight = 0
        self._fallback_log: dict[tuple[str, str], tuple[float, int]] = {}  # (key, reason) → (last logged, folded)
        self.memory_controller = None  # a gateway.memory_control.MemoryController when memory.enabled
        metrics.declare_variants(self.keys)
        # two-stage routing when the repository ships a router (see the module docstring)
        self.followup = (
            FollowupStage(
                router, self.keys, self.precisions, settings.planner, manifest.plan_accuracies(router.plan_names)
            )
            if router
            else None
        )
        # what /v1/status says about it; create_app replaces it with what load_router found
        self.router_info = LoadedRouter(router, "given to the service" if router else "none: single-stage", {})
        if self.followup is not None:
            metrics.declare_plans([p.name for p in self.followup.plans[1:]])

    def _order_entry(self) -> None:
        # two-stage entry order: the lowest precision first (INT8, the cheapest by design), then
        # the rest by profiled compute (on a CPU FP32 before FP16, whose casts make it slower).
        # Not compute alone: a profile taken on a busy host once measured INT8 slower than FP32,
        # and every sample entered on FP32
        low = int(self.ranks.min())
        self.entry_order = sorted(
            range(len(self.keys)), key=lambda j: (self.ranks[j] > low, self.estimator.service_ms(self.keys[j], 1))
        )

    async def profile_host(self, shared: Path | None = None, worker: int = 0) -> None:
        """Re-profile the variants on this host when the manifest's profiles come from another
        (serving/profiling.py); /v1/status reports what is in use. With several workers
        (`shared` set) the first to start (worker 0) measures and writes `shared`, the others plan with it."""
        # a worker restarted later finds the file too, and does not time the host under load
        info = load_shared(shared, self.estimator, worker) if shared is not None and shared.exists() else None
        if info is None:
            info = await profile_on_host(
                self.backend, self.manifest, self.keys, self.estimator, self.settings.profiling
            )
            if shared is not None:
                save_shared(shared, info)
        self.profile_info = info
        self._order_entry()  # the follow-up stage prices plans from the estimator: nothing else to update

    # ------------------------------------------------------------------ health

    def ready(self) -> bool:
        """At least one variant this service routes to is healthy."""
        health = self.backend.variants()
        return any(health[k].healthy for k in self.keys)

    def routable(self) -> np.ndarray:
        """(V,) bool: healthy at start-up and not taken out by the breaker."""
        health = self.backend.variants()
        now = time.monotonic()
        return np.array([health[k].healthy and self.breakers[k].open_until <= now for k in self.keys])

    def check_options(self, options: ClassifyOptions) -> None:
        """A floor above every precision this model offers, or a pinned variant this service does
        not route to (or below the floor), is the caller's mistake (422)."""
        self.check_floor(options.floor)
        v = options.variant
        if v is None:
            return
        if v not in self.precision_of:
            raise InputError(f"variant {v!r} is not served here (served: {', '.join(self.keys)})")
        floor = options.floor
        if floor is not None and self.precision_of[v].rank < floor.rank:
            raise InputError(f"variant {v} is {self.precision_of[v].value}, below the requested floor {floor.value}")

    def check_floor(self, floor: Precision | None) -> None:
        """A floor above every precision this model offers is the caller's mistake (422)."""
        if floor is not None and not (self.ranks >= floor.rank).any():
            offered = ", ".join(sorted({p.value for p in self.precisions}))
            raise InputError(
                f"X-Min-Precision {floor.value}: this service offers no variant at or above it (offers {offered})"
            )

    def _record_success(self, key: str) -> None:
        self.breakers[key].failures = 0

    def _record_failure(self, key: str) -> None:
        b = self.breakers[key]
        b.failures += 1
        b.total_failures += 1
        if b.failures >= self.settings.breaker.failures:
            b.open_until = time.monotonic() + self.settings.breaker.cooldown_s
            log.warning(
                "variant %s failed %d times in a row; out of routing for %.1f s",
                key,
                b.failures,
                self.settings.breaker.cooldown_s,
            )

    async def warm_up(self) -> None:
        """One request's worth of work before serving, so the first caller does not pay for lazy
        initialisation (image decoder plugins, router, first ORT runs with this shape path).
        Touches neither metrics nor the latency estimate."""
        size = self.manifest.image_size
        png = base64.b64encode(encode_png(np.zeros((size, size, 3), np.uint8))).decode()
        decode_instances({"instances": [{"b64": png}]}, 1, size)
        x = np.zeros((1, 3, size, size), np.float32)
        if self.followup is not None:  # the router and planner: first-call costs of NumPy paths
            self.followup.router.predict(np.zeros((1, len(self.manifest.classes)), np.float32))
        health = self.backend.variants()
        for key in self.keys:
            if health[key].healthy:
                try:
                    await asyncio.wait_for(
                        self.backend.infer(key, x), self.settings.deadline.no_budget_timeout_ms / 1e3
                    )
                except Exception as exc:  # a variant failing here will fail (and fall back) for callers too
                    log.warning("warm-up call on %s failed: %s", key, exc)

    # ------------------------------------------------------------------ classify

    async def classify(self, x: np.ndarray, options: ClassifyOptions, started: float) -> ClassifyResult:
        """x (N, 3, H, W) float32, the model input; `started` perf_counter() s at arrival."""
        self.check_options(options)
        n = x.shape[0]
        t = time.perf_counter()
        if self.followup is None:
            acc = np.broadcast_to(self.prior_row, (n, len(self.keys)))  # (N, V), read-only view
            entry_options = options
        else:
            # entry pass: equal predicted accuracy and the balanced price → the cheapest allowed variant
            acc = np.zeros((n, len(self.keys)))
            entry_options = replace(options, priority=Priority.BALANCED)
        state = _RequestState(
            x=x,
            acc=acc,
            options=entry_options,
            started=started,
            logits=np.empty((n, len(self.manifest.classes)), dtype=np.float32),
            answered_by=np.full(n, -1),
            decision_met=np.ones(n, dtype=bool),
            routing_s=time.perf_counter() - t,
        )
        await self._serve(state, np.arange(n), frozenset())
        variants = [self.keys[j] for j in state.answered_by]
        passes = [[k] for k in variants]
        probs = softmax(state.logits)
        followups = lost = 0
        if self.followup is not None and options.variant is None:  # a pinned variant answers alone
            followups, lost = await self._follow_up(state, options, probs, passes)
        self.metrics.decision_time.observe(state.routing_s)
        server_ms = (time.perf_counter() - started) * 1e3
        met = bool(state.decision_met.all())
        if options.budget_ms is not None:
            met = met and server_ms <= options.budget_ms
        return ClassifyResult(
            probs=probs,
            variants=variants,
            passes=passes,
            precisions=[highest_precision(p, self.precision_of).value for p in passes],
            budget_met=met,
            server_time_ms=server_ms,
            routing_time_ms=state.routing_s * 1e3,
            fallbacks=state.fallbacks,
            followups=followups,
            followups_lost=lost,
        )

    async def _follow_up(
        self, state: _RequestState, options: ClassifyOptions, probs: np.ndarray, passes: list[list[str]]
    ) -> tuple[int, int]:
        """Second stage, per entry variant (one, unless a fallback moved some samples): plan the
        follow-ups, run them, and write the combined answer into `probs` and `passes` in place.
        Returns (samples upgraded, follow-up passes lost to the deadline or a failure)."""
        assert self.followup is not None
        health = self.routable()
        routable = dict(zip(self.keys, health.tolist()))
        dl = self.settings.deadline
        reserve_ms = max(dl.followup_reserve_ms, dl.followup_reserve_share * (options.budget_ms or 0.0))
        deadline = None if options.budget_ms is None else state.started + (options.budget_ms - reserve_ms) / 1e3
        upgraded = lost = 0
        for j in np.unique(state.answered_by):
            entry = self.keys[int(j)]
            idx = np.flatnonzero(state.answered_by == j)
            t = time.perf_counter()
            allowed = self.followup.allowed(entry, routable, options.floor)
            remaining = self._remaining_ms(state)
            decision = self.followup.decide(
                entry,
                state.logits[idx],
                allowed,
                None if remaining is None else remaining - reserve_ms,
                options.priority,
                self.estimator,
            )
            state.routing_s += time.perf_counter() - t
            if not (decision.index > 0).any():
                continue
            result = await self.followup.run(
                entry,
                state.x[idx],
                state.logits[idx],
                decision,
                deadline,
                self.settings.deadline.no_budget_timeout_ms,
                self._infer,
            )
            probs[idx] = result.probs
            for i, p in zip(idx, result.passes):
                passes[i] = p
            for plan in set(result.plans) - {"none"}:
                self.metrics.followups.labels(plan).inc(result.plans.count(plan))
            if result.cut:
                self.metrics.followup_passes_lost.labels("cut").inc(result.cut)
            if result.failed:
                self.metrics.followup_passes_lost.labels("failed").inc(result.failed)
            upgraded += sum(len(p) > 1 for p in result.passes)
            lost += result.cut + result.failed
        return upgraded, lost

    async def _infer(self, key: str, x: np.ndarray, timeout_ms: float) -> np.ndarray:
        """One backend call with its accounting, cut after `timeout_ms` (TimeoutError). The latency
        estimate learns from a success or a timeout (at least this slow), not from an error or a
        cancellation (the client went away); only errors count towards the variant's breaker. The
        caller decides what a failure means: a fallback (`_call`), or the entry answer standing
        (follow-ups)."""
        n = x.shape[0]
        if timeout_ms <= 0:
            raise TimeoutError("no budget left for the follow-up")
        predicted = self.estimator.begin(key, n)
        gauge = self.metrics.variant_in_flight.labels(key)
        gauge.inc(n)
        t = time.perf_counter()
        observed: float | None = None
        try:
            # asyncio.timeout, not wait_for: no extra task and loop turn per call (4 against 16 µs
            # here), and an inline batch (batcher.py) then completes without leaving this task
            async with asyncio.timeout(timeout_ms / 1e3):
                logits = await self.backend.infer(key, x)
            if logits.shape != (n, len(self.manifest.classes)):
                raise ValueError(f"backend returned logits of shape {logits.shape} for {n} samples")
            observed = (time.perf_counter() - t) * 1e3
            self.metrics.backend_latency.labels(key).observe(observed / 1e3)
            self._record_success(key)
            return logits
        except TimeoutError:
            observed = (time.perf_counter() - t) * 1e3  # at least this slow: a latency observation
            raise
        except Exception:
            self._record_failure(key)
            raise
        finally:
            gauge.dec(n)
            self.estimator.end(key, n, observed, predicted)

    def _remaining_ms(self, state: _RequestState) -> float | None:
        if state.options.budget_ms is None:
            return None
        return state.options.budget_ms - (time.perf_counter() - state.started) * 1e3

    async def _serve(self, state: _RequestState, idx: np.ndarray, tried: frozenset[str]) -> None:
        """Route the samples `idx` among variants not in `tried`, and answer them."""
        t = time.perf_counter()
        floor_ok = self.ranks >= (state.options.floor.rank if state.options.floor else -1)
        allowed = floor_ok & self.routable() & np.array([k not in tried for k in self.keys])
        if state.options.variant is not None:  # pinned: that variant or nothing (no fallback)
            allowed &= np.array([k == state.options.variant for k in self.keys])
        remaining = self._remaining_ms(state)
        if not allowed.any():
            detail = "; ".join(state.errors) or self._why_none_allowed(floor_ok)
            raise ServiceUnavailable(f"no variant could answer: {detail}", retry_after_s=self._retry_after())
        if self.followup is not None:  # two-stage: the entry pass is the cheapest allowed variant
            await self._serve_entry(state, idx, tried, allowed, remaining, t)
            return
        estimates = np.array(self.estimator.estimates_ms(self.keys, len(idx)))  # (V,) ms, with queueing
        # the balanced price is compute, not wait: the profiled service time. Not × the observed
        # ratio either: on shared cores that ratio measures the load (queueing inside the
        # batcher), which would again make the busiest, cheapest variant look expensive
        cost = np.array([self.estimator.service_ms(k, len(idx)) for k in self.keys])
        # remaining ≤ 0 (budget already spent on a failed call) makes nothing feasible → cheapest allowed
        try:
            decision = route_batch(
                state.acc[idx],
                estimates,
                allowed,
                remaining,
                state.options.priority,
                self.settings.routing,
                cost_ms=cost,
                load=self.estimator.load(),
            )
        except NoVariantAllowed as exc:  # unreachable after the check above; kept for safety
            raise ServiceUnavailable(str(exc), retry_after_s=self._retry_after()) from exc
        state.decision_met[idx] &= decision.budget_met
        state.routing_s += time.perf_counter() - t
        calls = []
        for j in np.unique(decision.index):
            sub = idx[decision.index == j]
            last_resort = allowed.sum() == 1  # j is the only variant these samples may still go to
            calls.append(self._call(state, int(j), sub, float(estimates[j]), tried, last_resort))
        await asyncio.gather(*calls)

    async def _serve_entry(
        self,
        state: _RequestState,
        idx: np.ndarray,
        tried: frozenset[str],
        allowed: np.ndarray,
        remaining: float | None,
        t: float,
    ) -> None:
        """Two-stage entry: every sample to the allowed variant of least profiled compute (INT8,
        unless the floor forbids it), even when its queue is long. Spreading entry passes over
        costlier variants under load (what the single-stage policy does) added up to 3× the
        compute per sample exactly when the cores were short of it (the hot-path issue measured
        6.7 % of samples on FP32/FP16 at overload); follow-ups are where extra compute goes."""
        j = next(j for j in self.entry_order if allowed[j])
        estimate = self.estimator.estimate_ms(self.keys[j], len(idx))
        if remaining is not None and estimate > remaining:
            state.decision_met[idx] = False
        state.routing_s += time.perf_counter() - t
        await self._call(state, j, idx, estimate, tried, last_resort=bool(allowed.sum() == 1))

    async def _call(
        self,
        state: _RequestState,
        j: int,
        idx: np.ndarray,
        estimate_ms: float,
        tried: frozenset[str],
        last_resort: bool,
    ) -> None:
        key = self.keys[j]
        remaining = self._remaining_ms(state)
        if remaining is None or last_resort:
            timeout_ms = self.settings.deadline.no_budget_timeout_ms
        else:
            deadline = self.settings.deadline
            timeout_ms = max(remaining, deadline.slow_factor * estimate_ms) + deadline.grace_ms
        try:
            logits = await self._infer(key, state.x[idx], timeout_ms)
        except TimeoutError:
            reason, detail = "timeout", f"{key} timed out after {timeout_ms:.1f} ms"
        except Exception as exc:  # any backend failure: the next variant gets the samples
            reason, detail = "error", f"{key} failed: {exc}"
        else:
            state.logits[idx] = logits
            state.answered_by[idx] = j
            return
        self.metrics.fallbacks.labels(key, reason).inc()
        state.fallbacks += 1
        state.errors.append(detail)
        self._log_fallback(key, reason, len(idx), detail)
        await self._serve(state, idx, tried | {key})

    def _log_fallback(self, key: str, reason: str, n: int, detail: str) -> None:
        """One warning per variant and reason per FALLBACK_LOG_INTERVAL_S, with how many were
        folded into it: under overload a line per request would drown the log."""
        now = time.monotonic()
        last, folded = self._fallback_log.get((key, reason), (-np.inf, 0))
        if now - last < FALLBACK_LOG_INTERVAL_S:
            self._fallback_log[(key, reason)] = (last, folded + 1)
            return
        self._fallback_log[(key, reason)] = (now, 0)
        more = f" (+{folded} more {reason} fallbacks from {key} in the last {now - last:.0f} s)" if folded else ""
        log.warning("fallback for %d sample(s): %s%s", n, detail, more)

    def _why_none_allowed(self, floor_ok: np.ndarray) -> str:
        """Why no variant at or above the floor can be routed to: each one's health or breaker, grouped."""
        if not floor_ok.any():
            return "no variant at or above the precision floor"
        health, now, reasons = self.backend.variants(), time.monotonic(), {}
        for key, ok in zip(self.keys, floor_ok):
            if not ok:
                continue
            if not health[key].healthy:
                why = health[key].detail
            elif self.breakers[key].open_until > now:
                why = "out of routing after consecutive failures"
            else:
                continue
            reasons.setdefault(why, []).append(key)
        return "; ".join(f"{', '.join(keys)}: {why}" for why, keys in reasons.items()) or "no variant is routable"

    def _retry_after(self) -> int:
        """Seconds until a variant is likely back: the breaker's cooldown, at least 1."""
        now = time.monotonic()
        waits = [b.open_until - now for b in self.breakers.values() if b.open_until > now]
        return max(1, int(np.ceil(min(waits)))) if waits else 1
