"""The entry pass: every sample answered once by one variant, within the deadline, with fallback.

One path for both routings; the model's entry policy (model.py, chosen once per model) is the
only difference:
- `PriorRouting` (single-stage: no router in the repository, or planner.enabled false):
  p(correct | variant) is the manifest's prior, the same for every sample, and `route_batch`
  (the function the offline evaluation uses) picks a variant per sample against each variant's
  latency for a call of N samples now, the caller's budget and priority; samples of one variant
  go in one backend call, variants run in parallel.
- `CheapestEntry` (two-stage): every sample to the allowed variant of least profiled compute;
  the follow-up stage (followup.py) spends any extra compute after it.

The cheap entry (`CheapEntry`, two-stage with a speed router in the manifest): a variant cheaper
than the normal entry (a pruned INT8) with a router of its own. A request enters on it when it asks
`X-Priority: speed`, or when the normal entry's estimate (queue included) no longer fits its
remaining budget and the cheap one's does; otherwise it never takes an entry pass (but as the last
variant left). A failed cheap call falls back to the normal entry like any failed call.

Per backend call (both routings):
- it is abandoned at max(remaining budget, slow_factor × its own estimate) + grace: when the
  estimate already exceeds the budget the budget is lost anyway, and cutting the call at the
  budget would only turn a late answer into a later one elsewhere (a smaller slow_factor made
  more requests fall back under load and raised the p99, not lowered it). A call with no
  variant left to fall back to is cut only by deadline.no_budget_timeout_ms: under overload a
  late answer beats a 503.
- a call that fails or times out is re-routed among the variants not yet tried for these
  samples; when none is left the request fails with ServiceUnavailable (503). Only errors count
  towards a variant's breaker (breaker.py says why).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from adaptive_quant.core.latency import LatencyEstimator
from adaptive_quant.core.routing import NoVariantAllowed, Priority, RoutingConfig, route_batch
from adaptive_quant.serving.calls import VariantCalls
from adaptive_quant.serving.errors import ServiceUnavailable
from adaptive_quant.serving.metrics import GatewayMetrics
from adaptive_quant.serving.options import ClassifyOptions
from adaptive_quant.serving.settings import DeadlineSettings

if TYPE_CHECKING:
    from adaptive_quant.serving.model import ServedModel

log = logging.getLogger(__name__)

FALLBACK_LOG_INTERVAL_S = 5.0  # s between fallback warnings for one variant and reason

Group = tuple[int, np.ndarray, float]  # (variant column, sample indexes, latency estimate ms)


@dataclass(slots=True)
class RequestState:
    model: ServedModel  # the version serving this request, read once at its start
    x: np.ndarray  # (N, 3, H, W) float32 model input
    options: ClassifyOptions
    started: float  # perf_counter() s at arrival
    logits: np.ndarray  # (N, C) filled as variants answer
    answered_by: np.ndarray  # (N,) column of the variant that answered, -1 = not yet
    decision_met: np.ndarray  # (N,) bool: the routing's estimate fitted the budget
    routing_s: float = 0.0
    fallbacks: int = 0
    errors: list[str] = field(default_factory=list)

    def remaining_ms(self) -> float | None:
        """ms of the caller's budget left now; None without a budget."""
        if self.options.budget_ms is None:
            return None
        return self.options.budget_ms - (time.perf_counter() - self.started) * 1e3


class EntryPolicy(Protocol):
    def route(
        self, model: ServedModel, state: RequestState, idx: np.ndarray, allowed: np.ndarray, remaining: float | None
    ) -> list[Group]:
        """Split the samples `idx` among the `allowed` (V,) variants (at least one is); clear
        `state.decision_met` where the estimate does not fit `remaining` ms."""
        ...


class PriorRouting:
    """Single-stage: route_batch over the prior (each variant's validation accuracy)."""

    def __init__(self, prior_row: np.ndarray, config: RoutingConfig) -> None:
        self.prior_row = prior_row  # (V,) p(correct | variant), the same for every sample
        self.config = config

    def route(
        self, model: ServedModel, state: RequestState, idx: np.ndarray, allowed: np.ndarray, remaining: float | None
    ) -> list[Group]:
        n, keys, estimator = len(idx), model.keys, model.estimator
        estimates = np.array(estimator.estimates_ms(keys, n))  # (V,) ms, with queueing
        # the balanced price is compute, not wait: the profiled service time. Not × the observed
        # ratio either: on shared cores that ratio measures the load (queueing inside the
        # batcher), which would again make the busiest, cheapest variant look expensive
        cost = np.array([estimator.service_ms(k, n) for k in keys])
        # remaining ≤ 0 (budget already spent on a failed call) makes nothing feasible → cheapest allowed
        try:
            decision = route_batch(
                np.broadcast_to(self.prior_row, (n, len(keys))),  # (N, V), read-only view
                estimates,
                allowed,
                remaining,
                state.options.priority,
                self.config,
                cost_ms=cost,
                load=estimator.load(),
            )
        except NoVariantAllowed as exc:  # unreachable: the caller checked `allowed`; kept for safety
            raise ServiceUnavailable(str(exc), retry_after_s=model.breakers.retry_after_s()) from exc
        state.decision_met[idx] &= decision.budget_met
        return [(int(j), idx[decision.index == j], float(estimates[j])) for j in np.unique(decision.index)]


class CheapestEntry:
    """Two-stage: every sample to the allowed variant of least profiled compute (INT8, unless the
    floor forbids it), even when its queue is long. Spreading entry passes over costlier variants
    under load (what PriorRouting does) multiplied the compute per sample exactly when the cores
    were short of it; follow-ups are where extra compute goes."""

    def __init__(self, order: list[int]) -> None:
        self.order = order  # variant columns, the first allowed one answers

    @classmethod
    def over(cls, keys: list[str], ranks: np.ndarray, estimator: LatencyEstimator) -> CheapestEntry:
        """The lowest precision first (INT8, the cheapest by design), then the rest by profiled
        compute (on a CPU FP32 before FP16, whose casts make it slower). Not compute alone: a
        profile taken on a busy host can time INT8 slower than FP32, and every sample would
        enter on FP32."""
        low = int(ranks.min())
        return cls(sorted(range(len(keys)), key=lambda j: (ranks[j] > low, estimator.service_ms(keys[j], 1))))

    def pick(self, allowed: np.ndarray) -> int:
        """The column the entry pass takes among the `allowed` (V,) variants (at least one is)."""
        return next(j for j in self.order if allowed[j])

    def route(
        self, model: ServedModel, state: RequestState, idx: np.ndarray, allowed: np.ndarray, remaining: float | None
    ) -> list[Group]:
        j = self.pick(allowed)
        estimate = model.estimator.estimate_ms(model.keys[j], len(idx))
        if remaining is not None and estimate > remaining:
            state.decision_met[idx] = False
        return [(j, idx, estimate)]


class CheapEntry:
    """The speed router's entry: one variant cheaper than the normal entry, taken per request."""

    def __init__(self, column: int) -> None:
        self.column = column  # the cheap variant's column in the model's keys

    def estimate_ms(self, model: ServedModel, state: RequestState, n: int, allowed: np.ndarray) -> float | None:
        """The cheap entry's latency estimate (ms) when these n samples enter on it, else None.

        `allowed` (V,): what may answer now (floor, health, breaker, not tried yet). `speed` takes
        the cheap entry whenever it is allowed; balanced and quality only when the normal entry's
        estimate, its queue included, does not fit the remaining budget and the cheap one's does
        (an answer within the budget at the cheap entry's accuracy, escalated by its router, beats
        a late one). Without a budget they always enter normally."""
        j = self.column
        if not allowed[j]:
            return None
        estimator, key = model.estimator, model.keys[j]
        cheap_ms = estimator.estimate_ms(key, n)
        if state.options.priority is Priority.SPEED:
            return cheap_ms
        remaining = state.remaining_ms()
        normal = allowed & model.entry_ok
        if remaining is None or not normal.any() or not isinstance(model.entry, CheapestEntry):
            return None
        normal_ms = estimator.estimate_ms(model.keys[model.entry.pick(normal)], n)
        return cheap_ms if normal_ms > remaining >= cheap_ms else None


class EntryPass:
    """Runs the entry pass of every request of one service (any model version, on its own backend)."""

    def __init__(self, metrics: GatewayMetrics, calls: VariantCalls, deadline: DeadlineSettings) -> None:
        self.metrics = metrics
        self.calls = calls
        self.deadline = deadline
        self._fallback_log: dict[tuple[str, str], tuple[float, int]] = {}  # (key, reason) → (last logged, folded)

    async def serve(self, state: RequestState, idx: np.ndarray, tried: frozenset[str]) -> None:
        """Route the samples `idx` among the variants not in `tried`, and answer them."""
        t = time.perf_counter()
        model, options = state.model, state.options
        floor_ok = model.ranks >= (options.floor.rank if options.floor else -1)
        allowed = (
            floor_ok
            & model.routable(model.backend.variants(), time.monotonic())
            & np.array([k not in tried for k in model.keys])
        )
        if options.variant is not None:  # pinned: that variant or nothing (no fallback)
            allowed &= np.array([k == options.variant for k in model.keys])
        else:
            cheap = model.cheap_entry
            estimate = None if cheap is None else cheap.estimate_ms(model, state, len(idx), allowed)
            if cheap is not None and estimate is not None:
                remaining = state.remaining_ms()
                if remaining is not None and estimate > remaining:
                    state.decision_met[idx] = False
                state.routing_s += time.perf_counter() - t
                # not a last resort unless it is the only variant left: a failure falls back to the normal entry
                await self._call(state, cheap.column, idx, estimate, tried, bool(allowed.sum() == 1))
                return
            if (allowed & model.entry_ok).any():  # a second network's variants (and the cheap entry) are last resorts
                allowed &= model.entry_ok
        if not allowed.any():
            detail = "; ".join(state.errors) or self._why_none_allowed(model, floor_ok)
            raise ServiceUnavailable(f"no variant could answer: {detail}", retry_after_s=model.breakers.retry_after_s())
        groups = model.entry.route(model, state, idx, allowed, state.remaining_ms())
        state.routing_s += time.perf_counter() - t
        last_resort = bool(allowed.sum() == 1)  # the samples may go to this variant only
        if len(groups) == 1:  # the common case: awaited here, no task
            j, sub, estimate = groups[0]
            await self._call(state, j, sub, estimate, tried, last_resort)
        else:
            await asyncio.gather(*(self._call(state, j, sub, e, tried, last_resort) for j, sub, e in groups))

    async def _call(
        self,
        state: RequestState,
        j: int,
        idx: np.ndarray,
        estimate_ms: float,
        tried: frozenset[str],
        last_resort: bool,
    ) -> None:
        model = state.model
        key = model.keys[j]
        remaining = state.remaining_ms()
        if remaining is None or last_resort:
            timeout_ms = self.deadline.no_budget_timeout_ms
        else:
            timeout_ms = max(remaining, self.deadline.slow_factor * estimate_ms) + self.deadline.grace_ms
        try:
            logits = await self.calls.infer(model, key, state.x[idx], timeout_ms)
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
        await self.serve(state, idx, tried | {key})

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

    def _why_none_allowed(self, model: ServedModel, floor_ok: np.ndarray) -> str:
        """Why no variant at or above the floor can be routed to: each one's health or breaker, grouped."""
        if not floor_ok.any():
            return "no variant at or above the precision floor"
        health, now, reasons = model.backend.variants(), time.monotonic(), {}
        for key, ok in zip(model.keys, floor_ok):
            if not ok:
                continue
            if not health[key].healthy:
                why = health[key].detail
            elif model.breakers[key].open_until > now:
                why = "out of routing after consecutive failures"
            else:
                continue
            reasons.setdefault(why, []).append(key)
        return "; ".join(f"{', '.join(keys)}: {why}" for why, keys in reasons.items()) or "no variant is routable"
