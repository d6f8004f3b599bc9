"""The second stage of a request: plan follow-up passes after the entry pass, run them, combine.

After the entry pass answered every sample, the router predictor reads the entry logits and gives
p(right | plan) per sample and plan; `core.planner.plan_followups` picks a plan per sample within
the remaining budget, priced by the load. Follow-up passes of one (variant, view) are batched in
one backend call; all calls run at once and are cut at the deadline. A cut or failed pass leaves
the entry answer (and any other pass that did answer) standing: only the entry pass can fail a
request. The answer averages the softmax probabilities of the passes that ran.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from adaptive_quant.core.latency import LatencyEstimator
from adaptive_quant.core.manifest import Manifest
from adaptive_quant.core.planner import PlanDecision, PlannerConfig, plan_followups, plan_one
from adaptive_quant.core.plans import NONE, Pass, Plan, applicable, apply_view
from adaptive_quant.core.precision import Precision
from adaptive_quant.core.routing import Priority
from adaptive_quant.core.stats import softmax
from adaptive_quant.predictor.deferral import DeferralPredictor

log = logging.getLogger(__name__)


class RouterPredictor(Protocol):
    """What the gateway needs of the router's predictor (predictor.deferral.DeferralPredictor)."""

    plan_names: list[str]  # column names; column 0 is "none"

    def predict(self, entry_logits: np.ndarray) -> np.ndarray:  # (N, C) → (N, P) p(right | plan)
        ...

    # optional: `predict_row(values: list[float]) -> list[float]`, one image's C logits → P
    # probabilities, the same as predict(values[None])[0]. When present, one-image requests take
    # the NumPy-free planning path (FollowupStage._decide_one)


# a backend call as the service makes it: (variant key, inputs (n, 3, H, W), timeout ms) → logits (n, C);
# raises TimeoutError when cut, anything else when the variant failed
InferCall = Callable[[str, np.ndarray, float], Awaitable[np.ndarray]]


@dataclass
class FollowupResult:
    probs: np.ndarray  # (N, C) averaged softmax of the passes that ran, entry included
    passes: list[list[str]]  # per sample, the passes that answered it, entry first
    plans: list[str]  # (N,) the plan chosen per sample ("none" = entry answer only)
    cut: int  # follow-up passes (sample × pass) cut at the deadline
    failed: int  # follow-up passes that failed (the entry answer stood)


class FollowupStage:
    """Plans and runs follow-ups for one service; one instance, shared by all requests."""

    def __init__(
        self,
        router: RouterPredictor,
        keys: Sequence[str],
        precisions: Sequence[Precision],
        config: PlannerConfig,
        prior: Sequence[float] | None = None,
        load_priced: bool = True,
    ) -> None:
        """`prior`: each plan's validation accuracy in the router's column order (Manifest.plan_accuracies),
        which breaks quality's ties (core.planner); None: ties go to the cheaper plan. `load_priced`:
        the price of a follow-up rises with the load (core.planner); False for the cheap entry's
        stage (planner.cheap_entry_load_priced)."""
        if not router.plan_names or router.plan_names[0] != NONE:
            raise ValueError(f"the router's first plan column must be {NONE!r}, got {router.plan_names[:1]}")
        self.router = router
        self.load_priced = load_priced
        self.plans = [Plan.parse(name) for name in router.plan_names]  # column order of the predictor
        self.keys = list(keys)
        self.precision = dict(zip(keys, precisions))
        self.config = config
        if prior is not None and len(prior) != len(router.plan_names):
            raise ValueError(f"prior must give one accuracy per plan {router.plan_names}; got {len(prior)}")
        self.prior = None if prior is None else [float(v) for v in prior]
        self._prior_array = None if prior is None else np.asarray(self.prior)
        known = set(keys)
        # plans over variants this service does not serve (pinned to a subset) are never allowed
        self._servable = np.array([p.variants <= known for p in self.plans])
        # per plan, the indexes into `keys` of its passes' variants (a variant twice if it runs twice)
        self._pass_index = [
            [self.keys.index(p.variant) for p in plan.passes if p.variant in self.precision] for plan in self.plans
        ]
        # (P, V) passes of each plan on each served variant: a plan's price is this times per-variant figures
        self._passes = np.zeros((len(self.plans), len(self.keys)))
        for j, variants in enumerate(self._pass_index):
            for v in variants:
                self._passes[j, v] += 1
        self._allowed_cache: dict[tuple, np.ndarray] = {}
        # (1,) index arrays of one-image decisions, one per plan, shared and read-only (no caller writes them)
        self._index_one = [np.array([j], dtype=np.int64) for j in range(len(self.plans))]
        for a in self._index_one:
            a.setflags(write=False)
        self._cost_one: dict[tuple, list[float]] = {}  # (entry, estimator, profile version) → (P,) cost
        # the one-image fast path, when the router offers it (predictor.deferral.DeferralPredictor does)
        self._predict_row: Callable[[list[float]], list[float]] | None = getattr(router, "predict_row", None)

    def allowed(self, entry: str, routable: dict[str, bool], floor: Precision | None) -> np.ndarray:
        """(P,) bool: plans whose variants are routable, at or above the floor, and don't repeat the entry."""
        ok_variants = frozenset(
            k for k in self.keys if routable.get(k, False) and (floor is None or self.precision[k].rank >= floor.rank)
        )
        key = (entry, ok_variants)  # a handful of combinations: health changes rarely
        mask = self._allowed_cache.get(key)
        if mask is None:
            entry_pass = Pass(entry)
            mask = np.array([applicable(p, entry_pass, ok_variants) for p in self.plans]) & self._servable
            mask[0] = True
            self._allowed_cache[key] = mask
        return mask

    def price(self, entry: str, n: int, estimator: LatencyEstimator) -> tuple[np.ndarray, np.ndarray]:
        """(extra_cost (P,) in entry passes, extra_ms (P,) latency estimate now) for a request of n samples.

        Passes of one plan run at once, but on shared cores they compete, so a plan's time is the
        sum of its passes' estimates (conservative); its cost is their profiled compute over the entry's.
        """
        entry_ms = max(estimator.compute_ms(entry, n), 1e-6)
        service = np.array([estimator.compute_ms(k, n) for k in self.keys])  # (V,) p50, cached by the estimator
        now = np.array([estimator.estimate_ms(k, n) for k in self.keys])  # (V,) with the queue seen now
        # plans over an unserved variant are never allowed (mask), so their price does not matter
        return self._passes @ service / entry_ms, self._passes @ now

    def decide(
        self,
        entry: str,
        entry_logits: np.ndarray,
        allowed: np.ndarray,
        remaining_ms: float | None,
        priority: Priority,
        estimator: LatencyEstimator,
    ) -> PlanDecision:
        n = entry_logits.shape[0]
        if n == 1 and self._predict_row is not None:
            return self._decide_one(entry, entry_logits, allowed, remaining_ms, priority, estimator)
        acc = self.router.predict(entry_logits)  # (N, P)
        cost, ms = self.price(entry, n, estimator)
        return plan_followups(
            acc, cost, ms, allowed, remaining_ms, priority, self.config, self._load(estimator), self._prior_array
        )

    def _load(self, estimator: LatencyEstimator) -> float:
        """The load the price rises with (samples in flight / max batch); 0 when this stage is not load-priced."""
        return estimator.load() if self.load_priced else 0.0

    def _decide_one(
        self,
        entry: str,
        entry_logits: np.ndarray,
        allowed: np.ndarray,
        remaining_ms: float | None,
        priority: Priority,
        estimator: LatencyEstimator,
    ) -> PlanDecision:
        """`decide` for a one-image request (most of the traffic) in plain Python floats: the same
        decision, ~2× cheaper, because each NumPy call on a (1, P) array costs ~1 µs whatever its size."""
        assert self._predict_row is not None
        row = self._predict_row(entry_logits[0].tolist())
        key = (entry, id(estimator), estimator.profile_version)
        cost = self._cost_one.get(key)
        if cost is None:  # relative costs change only with the profiles: priced once per profile
            cost = self._cost_one[key] = self.price(entry, 1, estimator)[0].tolist()
        now = estimator.estimates_ms(self.keys, 1)
        ms = [sum([now[v] for v in passes]) for passes in self._pass_index]
        index, predicted = plan_one(
            row, cost, ms, allowed.tolist(), remaining_ms, priority, self.config, self._load(estimator), self.prior
        )
        return PlanDecision(index=self._index_one[index], predicted=np.array([predicted]))

    async def run(
        self,
        entry: str,
        x: np.ndarray,
        entry_logits: np.ndarray,
        decision: PlanDecision,
        deadline: float | None,
        timeout_ms_if_no_budget: float,
        infer: InferCall,
    ) -> FollowupResult:
        """Run the chosen plans' passes, batched per (variant, view), cut at `deadline` (perf_counter s)."""
        n = entry_logits.shape[0]
        entry_probs = softmax(entry_logits)
        sums = entry_probs.astype(np.float32, copy=True)  # (N, C) running sum of probabilities
        counts = np.ones(n, dtype=np.int64)
        passes: list[list[str]] = [[entry] for _ in range(n)]
        # (variant, view) → samples that need that pass
        groups: dict[Pass, list[int]] = {}
        for i, j in enumerate(decision.index):
            for p in self.plans[int(j)].passes:
                groups.setdefault(p, []).append(i)
        cut = failed = 0
        if groups:
            order = list(groups)
            timeout_ms = (
                timeout_ms_if_no_budget if deadline is None else max(0.0, (deadline - time.perf_counter()) * 1e3)
            )
            outcomes = await asyncio.gather(
                *(infer(p.variant, apply_view(x[groups[p]], p.view), timeout_ms) for p in order),
                return_exceptions=True,
            )
            for p, out in zip(order, outcomes):
                idx = np.asarray(groups[p])
                if isinstance(out, TimeoutError):
                    cut += len(idx)
                    continue
                if isinstance(out, BaseException):
                    failed += len(idx)
                    log.debug("follow-up %s failed for %d sample(s): %s", p.name, len(idx), out)
                    continue
                sums[idx] += softmax(out)
                counts[idx] += 1
                for i in idx:
                    passes[i].append(p.name)
        probs = sums / counts[:, None]
        return FollowupResult(
            probs=probs,
            passes=passes,
            plans=[self.plans[int(j)].name for j in decision.index],
            cut=cut,
            failed=failed,
        )


# the priorities by how much follow-up they buy: speed < balanced < quality
_PRIORITY_RANK = {Priority.SPEED: 0, Priority.BALANCED: 1, Priority.QUALITY: 2}


def followup_priority(requested: Priority, entered_cheap: bool, config: PlannerConfig) -> Priority:
    """The priority a sample's follow-ups are planned with: the request's, except that a sample that
    entered on the cheap entry (the speed router's) gets at least `planner.cheap_entry_priority`
    (balanced). The cheap entry is already the request's saving (a pruned INT8: 0.64x INT8's time,
    1.4 points less accurate on validation); escalating its 10-15 % least confident samples is what
    brings the answer back to INT8's accuracy, and `speed` pricing would shed exactly that."""
    if entered_cheap and _PRIORITY_RANK[config.cheap_entry_priority] > _PRIORITY_RANK[requested]:
        return config.cheap_entry_priority
    return requested


def highest_precision(passes: Sequence[str], precision: dict[str, Precision]) -> Precision:
    """The highest precision among the passes that answered a sample ("fp32" for ["int8", "fp32:hflip"])."""
    # pass names come from the plans (already validated): the variant is what precedes any ':view'
    return max((precision[p.partition(":")[0]] for p in passes), key=lambda q: q.rank)


@dataclass
class LoadedRouter:
    predictor: DeferralPredictor | None  # None: single-stage routing
    summary: str  # one line for the start-up log and /v1/status
    detail: dict[str, Any]  # the manifest's router entry (or why there is none)


def load_router(repository: str | Path, manifest: Manifest, enabled: bool = True, role: str = "main") -> LoadedRouter:
    """The two-stage router the manifest names (role "main": `router`; "speed": `speed_router`, the
    cheap entry's), checked against its sha256.

    A repository without one (made before two-stage routing) serves single-stage. A router that is
    named but missing or damaged is logged as an error and the gateway serves single-stage: it
    gives up the follow-ups' quality, not availability (every variant still answers). Likewise a
    damaged speed router: the gateway serves without the cheap entry (every request enters normally)."""
    speed = role == "speed"
    entry = manifest.speed_router if speed else manifest.router
    without = "no cheap entry" if speed else "single-stage routing"
    if not enabled:
        return LoadedRouter(None, f"off (planner.enabled is false): {without}", {"reason": "disabled"})
    if not entry:
        return LoadedRouter(None, f"none in the manifest: {without}", {"reason": "no router in manifest"})
    folder = (Path(repository) / entry["path"]).parent
    try:
        predictor = DeferralPredictor.load(folder, sha256=entry.get("sha256"))
    except (ValueError, OSError) as exc:
        what = "speed router (the cheap entry's)" if speed else "router"
        log.error("%s named by the manifest cannot be used (%s); serving with %s", what, exc, without)
        return LoadedRouter(None, f"unusable ({exc}); {without}", {"reason": str(exc)})
    plans = ", ".join(predictor.plan_names[1:])
    auroc = entry.get("fix_auroc", {})
    first = next(iter(auroc.items()), None)
    measured = (
        f"; fix AUROC {first[0]} {first[1]['learned']:.2f} (confidence rule {first[1]['confidence']:.2f}, validation)"
        if first
        else ""
    )
    summary = (
        f"two-stage after {entry.get('entry')}: mlp {'-'.join(map(str, predictor.hidden))} "
        f"({predictor.num_parameters()} parameters) over {len(predictor.feature_names)} entry-output features; "
        f"plans {plans}{measured}"
    )
    return LoadedRouter(predictor, summary, dict(entry))
