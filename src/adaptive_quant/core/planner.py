"""The follow-up planner: after the entry pass, which plan each sample gets. Pure, vectorised, no I/O.

The same function runs in the gateway (a request's N samples) and offline in the evaluation (a
whole split), so the report measures what production does.

Per sample and plan j (column 0 is "none": no extra pass, cost 0, always feasible):
  feasible(j) = allowed(j) and s · extra_ms(j) <= remaining budget (always, when there is no budget),
               s = 1 + (slack − 1) · min(1, load): the margin grows with the load
  balanced → the feasible plan maximising  acc(j) − price · extra_cost(j),
             price = followup_price · (1 + load_price · load): a plan must promise
             `followup_price` of predicted accuracy for each entry pass worth of extra compute,
             and more under load, so follow-ups are shed first when the server is busy (the
             service gives up quality, not latency)
  quality  → the most accurate feasible plan. Given the plans' validation accuracies (`prior`),
             predictions within `quality_tie` × (1 − min(1, load)) of the best count as equal and
             the plan that is more accurate on validation wins among them (then the cheaper);
             without a prior, ties within 1e-9 go to the cheaper
             Which follow-up a sample that escalates gets: given a prior, the follow-ups scoring within
             `plan_tie` of the best one tie, and the one more accurate on validation wins (then the
             cheaper); the price alone decides whether it escalates
  speed    → the balanced choice only if its predicted gain over "none" clears `speed_tolerance`
So in predicted accuracy quality ≥ balanced − quality_tie (≥ balanced exactly without a prior),
balanced ≥ none − plan_tie (≥ none exactly without a prior) and speed ≥ none, sample by sample.

extra_cost is relative (compute of the extra passes / compute of the entry pass at the same batch
size), so the price means the same on a CPU and a GPU; extra_ms is absolute and includes queueing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydantic import ConfigDict, Field

from adaptive_quant.core.routing import Priority
from adaptive_quant.core.settings import Section

_TIE = 1e-9  # predicted accuracies closer than this are equal (ties go to the cheaper plan)


class PlannerConfig(Section):
    """The planner's knobs; validated on construction."""

    model_config = ConfigDict(frozen=True)
    config_key: ClassVar[str] = "planner"

    # false: single-stage routing even when the repository ships a router (A/B runs, benchmarks)
    enabled: bool = True
    # balanced: predicted accuracy (a share: 0.01 = one point) a follow-up must add per entry pass
    # worth of extra compute. A flipped INT8 pass costs ~1 entry pass, so at 0.005 it runs where the
    # predictor expects it to turn at least 0.5 % of such samples from wrong to right. Chosen on the
    # validation split (`aq-fit-router --cross-validate 5 --repeats 3`, three networks): 0.01 gave
    # 91.65 % at 1.33x the entry's compute, 0.005 91.73 % at 1.50x, 0 91.80 % at 1.87x; from 0.01
    # to 0.005 a pass buys ~0.5 points, below that ~0.2. Was 0.01 with one network's plans
    followup_price: float = Field(0.005, ge=0.0)
    # under load: price × (1 + load_price × load), load = samples in flight / max batch size.
    # 1 barely shed anything at load ≈ 2, and under a tight budget most follow-ups were then cut
    # at the deadline; 4 makes a busy server's follow-ups promise ~9× the idle gain
    load_price: float = Field(4.0, ge=0.0)
    # a follow-up is feasible only if s × its latency estimate fits the remaining budget, with
    # s = 1 + (slack − 1) × min(1, load). Under load the estimate is a profile plus the queue seen
    # now, and a pass planned to the last millisecond is a pass cut at the deadline (its compute
    # spent for nothing); on an idle server it is the profile's p95, which already has its margin.
    # With a fixed 2×, a flip that fit an idle budget at 2.0-2.9× the entry time was never planned,
    # and quality answered INT8 alone where the fixed flip plan fit and was more accurate
    slack: float = Field(2.0, ge=1.0)
    # speed: a follow-up only when its predicted gain over "none" is at least this share
    speed_tolerance: float = Field(0.02, ge=0.0, le=1.0)
    # quality: predicted accuracies closer than this share are ties, won by the plan more accurate
    # on validation. The router resolves gains of ~1 point on uncertain samples, but on confident
    # ones the true gain of a second view is smaller than its error and spread thin; with plans over
    # three networks its per-plan predictions differ by less than their error almost everywhere.
    # Chosen by `aq-fit-router --cross-validate 5 --repeats 3` (router and prior refitted per fold):
    # the tie whose worst budget of the sweep is best against the fixed choice that fits and that
    # the other folds pick (what a deployment without routing would ship). 0.1 is the smallest that
    # is never below it (worst 0.00 points; 0.02 gave −0.15, 0 gave −0.37): on an idle server
    # quality then runs, for every sample, the plan most accurate on validation that fits. It
    # shrinks to nothing at a load of one full batch in flight, where the prediction alone decides.
    # 0 turns the rule off
    quality_tie: float = Field(0.1, ge=0.0, le=1.0)
    # balanced and speed, once the price says a sample escalates: which follow-up. Plans whose score
    # (predicted accuracy − price × compute) is within `plan_tie` of the best follow-up's are ties,
    # won by the plan more accurate on validation (then the cheaper). With plans over three networks
    # the router's per-plan predictions differ by less than their error, and the highest one is
    # often a noisier plan: 5-fold cross-validation on the validation split (3 fold assignments,
    # 15 plans) gave balanced 91.39 % at 1.23x compute without the rule and 91.65 % at 1.33x with
    # 0.02, at the same 12.3 % escalated. Shrinks to nothing under load like quality_tie. 0 = off
    plan_tie: float = Field(0.02, ge=0.0, le=1.0)
    # the least priority the follow-ups of a sample that entered on the cheap entry (the speed router's,
    # e.g. a pruned INT8) are planned with, whatever the request asked: a speed request entering there
    # is planned `balanced`. The cheap entry is already the saving (0.64x INT8's time); escalating its
    # uncertain 10-15 % is what keeps the answer at INT8's accuracy, and `speed` would shed that
    # escalation. A request asking more (quality) keeps its own. `speed` here: no floor
    cheap_entry_priority: Priority = Field(Priority.BALANCED, strict=False)  # "balanced" → Priority.BALANCED
    # whether the cheap entry's follow-ups are priced up by the load like every other follow-up.
    # Off: under load the price rise shed exactly the escalations that keep a speed answer at INT8's
    # accuracy (32-image requests at concurrency 8: 1.44x the plain server's images/s but 0.6 points
    # below it). A budget still sheds them: feasibility uses the latency estimates, queue included
    cheap_entry_load_priced: bool = False
    # the price of the cheap entry's follow-ups (followup_price's meaning, in the cheap entry's passes).
    # The cheap entry is there for throughput: its follow-ups should bring the answer back to INT8's
    # accuracy and no further. With followup_price's 0.005 and plan_tie (this stage is not load-priced,
    # so nothing shrank the tie under load), 32-image requests at concurrency 8 ran at 0.77x the plain
    # server's images/s; at 0.01 without the tie 0.94x, and 1.25-1.29x with two networks' speed plans
    cheap_entry_price: float = Field(0.01, ge=0.0)

    def for_cheap_entry(self) -> PlannerConfig:
        """The planner as the cheap entry's follow-ups use it: its own price, and no plan_tie (which
        buys validation accuracy with compute; the cheap entry is there to save compute)."""
        return self.model_copy(update={"followup_price": self.cheap_entry_price, "plan_tie": 0.0})


@dataclass(frozen=True)
class PlanDecision:
    index: np.ndarray  # (N,) int, column of the chosen plan; 0 = none
    predicted: np.ndarray  # (N,) float, predicted p(right) of the chosen plan


def plan_followups(
    pred_acc: np.ndarray,
    extra_cost: np.ndarray,
    extra_ms: np.ndarray,
    allowed: np.ndarray,
    remaining_ms: float | np.ndarray | None,
    priority: Priority,
    config: PlannerConfig,
    load: float = 0.0,
    prior: np.ndarray | None = None,
) -> PlanDecision:
    """Choose a follow-up plan for each of N samples.

    pred_acc:     (N, P) predicted p(final answer right | sample, plan); column 0 = none
    extra_cost:   (P,) extra compute per plan in entry passes (column 0 = 0)
    extra_ms:     (P,) or (N, P) latency estimate of the plan's extra passes now, ms
    allowed:      (P,) bool: the plan's variants are allowed and can serve (column 0 is always allowed)
    remaining_ms: budget left after the entry pass, ms: None (no budget), a scalar or (N,)
    load:         samples in flight / max batch size (raises the balanced price)
    prior:        (P,) each plan's accuracy on the validation split (column 0: the entry alone), or
                  None: breaks quality's ties within `config.quality_tie`
    """
    acc = np.asarray(pred_acc, dtype=np.float64)
    if acc.ndim == 2 and acc.shape[0] == 1 and np.ndim(extra_ms) == 1 and np.ndim(remaining_ms) == 0:
        # one-sample requests (most of the traffic): the same rule over P plain floats. NumPy's
        # per-call overhead (~1 µs) on (1, P) arrays was most of the vectorised path's cost
        return _plan_one(acc, extra_cost, extra_ms, allowed, remaining_ms, priority, config, load, prior)
    if acc.ndim != 2 or acc.shape[1] < 1:
        raise ValueError(f"pred_acc must be (N, P) with P >= 1 (column 0 = none), got shape {acc.shape}")
    n, p = acc.shape
    cost = np.asarray(extra_cost, dtype=np.float64)
    if cost.shape != (p,):
        raise ValueError(f"extra_cost must be ({p},), got shape {cost.shape}")
    ms = np.asarray(extra_ms, dtype=np.float64)
    if ms.shape not in ((p,), (n, p)):
        raise ValueError(f"extra_ms must be ({p},) or ({n}, {p}), got shape {ms.shape}")
    ok = np.array(allowed, dtype=bool)
    if ok.shape != (p,):
        raise ValueError(f"allowed must be ({p},), got shape {ok.shape}")
    ok[0] = True  # "none" is always possible: the entry answer stands
    if prior is not None:
        prior = np.asarray(prior, dtype=np.float64)
        if prior.shape != (p,):
            raise ValueError(f"prior must be ({p},), one validation accuracy per plan; got shape {prior.shape}")
    if n == 0:
        return PlanDecision(np.zeros(0, dtype=np.int64), np.zeros(0))

    if remaining_ms is None:
        feasible = ok  # (P,), broadcasts over the samples
    else:
        left = np.asarray(remaining_ms, dtype=np.float64).reshape(-1, 1)  # (N, 1) or (1, 1)
        feasible = (effective_slack(config, load) * ms <= left) & ok  # (1 or N, P)
        feasible[..., 0] = True

    price = config.followup_price * (1.0 + config.load_price * max(0.0, load))
    score = acc if priority is Priority.QUALITY else acc - price * cost  # (N, P)
    score = np.where(feasible, score, -np.inf)
    tie = _quality_tie(priority, config, prior, load)
    candidates = score >= score.max(axis=1, keepdims=True) - tie
    if tie > _TIE:  # quality with a prior: the plan more accurate on validation wins the tie
        ranked = np.where(candidates, prior, -np.inf)
        candidates &= ranked >= ranked.max(axis=1, keepdims=True) - _TIE
    # among equally good plans, the cheapest (argmin over cost; "none" wins every tie it is in)
    index = np.where(candidates, cost, np.inf).argmin(axis=1)
    rows = np.arange(n)
    ptie = _plan_tie(priority, config, prior, load)
    if ptie > _TIE and p > 1:  # which follow-up, for the samples that escalate: validation breaks the tie
        follow = score[:, 1:]
        near = follow >= follow.max(axis=1, keepdims=True) - ptie
        ranked = np.where(near, prior[1:], -np.inf)
        near &= ranked >= ranked.max(axis=1, keepdims=True) - _TIE
        index = np.where(index > 0, np.where(near, cost[1:], np.inf).argmin(axis=1) + 1, 0)
    if priority is Priority.SPEED:
        index = np.where(acc[rows, index] - acc[:, 0] >= config.speed_tolerance - _TIE, index, 0)
    return PlanDecision(index=index, predicted=acc[rows, index])


def _busy(load: float) -> float:
    """How busy the server is for the margins below: the load clamped to [0, 1] (1 = a full batch in flight)."""
    return min(1.0, max(0.0, load))


def effective_slack(config: PlannerConfig, load: float) -> float:
    """The margin a follow-up's estimate needs within the remaining budget: 1 when idle, `slack` at load ≥ 1."""
    return 1.0 + (config.slack - 1.0) * _busy(load)


def _quality_tie(priority: Priority, config: PlannerConfig, prior: object, load: float) -> float:
    """How close two predictions must be to tie: for quality given a prior, `quality_tie` on an idle
    server, shrinking to none at a load of one full batch in flight; else _TIE.

    A tie spends compute where the router cannot tell the plans apart (it can escalate every
    sample, at several times the compute, for a hundredth of a point). That is worth it only while the
    compute is free: under load it would delay everyone queued, so quality falls back to the
    prediction alone (its follow-ups shed first, like balanced's)."""
    if priority is Priority.QUALITY and prior is not None and config.quality_tie > _TIE:
        return max(_TIE, config.quality_tie * (1.0 - _busy(load)))
    return _TIE


def _plan_tie(priority: Priority, config: PlannerConfig, prior: object, load: float) -> float:
    """How close two follow-ups' scores must be to tie for balanced and speed, given a prior:
    `plan_tie` on an idle server, shrinking to none at a load of one full batch in flight; else 0.
    It never decides whether a sample escalates (the price does), only which plan it gets."""
    if priority is not Priority.QUALITY and prior is not None and config.plan_tie > _TIE:
        return max(0.0, config.plan_tie * (1.0 - _busy(load)))
    return 0.0


def _plan_one(
    acc: np.ndarray,
    extra_cost: np.ndarray,
    extra_ms: np.ndarray,
    allowed: np.ndarray,
    remaining_ms: float | None,
    priority: Priority,
    config: PlannerConfig,
    load: float,
    prior: np.ndarray | None,
) -> PlanDecision:
    """`plan_followups` for N = 1, scalar remaining budget and (P,) extra_ms: identical decisions."""
    row = acc[0].tolist()
    cost, ms, ok = list(map(float, extra_cost)), list(map(float, extra_ms)), [bool(a) for a in allowed]
    ranks = None if prior is None else [float(v) for v in np.asarray(prior, dtype=np.float64).ravel()]
    index, predicted = plan_one(row, cost, ms, ok, remaining_ms, priority, config, load, ranks)
    return PlanDecision(index=np.array([index], dtype=np.int64), predicted=np.array([predicted]))


def plan_one(
    row: list[float],
    cost: list[float],
    ms: list[float],
    ok: list[bool],
    remaining_ms: float | None,
    priority: Priority,
    config: PlannerConfig,
    load: float = 0.0,
    prior: list[float] | None = None,
) -> tuple[int, float]:
    """The rule of `plan_followups` for one sample over P plain Python floats: (plan index, its
    predicted p(right)). The gateway's one-image path calls it straight, with no NumPy at all:
    NumPy's ~1 µs per call on (1, P) arrays was most of the vectorised path's cost at N = 1."""
    p = len(row)
    if not (len(cost) == len(ms) == len(ok) == p) or p < 1 or (prior is not None and len(prior) != p):
        raise ValueError(
            f"extra_cost, extra_ms, allowed (and prior) must be ({p},) like pred_acc's row; "
            f"got {len(cost)}, {len(ms)}, {len(ok)}{'' if prior is None else f', {len(prior)}'} (column 0 = none)"
        )
    # quality ranks by predicted accuracy alone: a zero price
    price = 0.0 if priority is Priority.QUALITY else config.followup_price * (1.0 + config.load_price * max(0.0, load))
    left = math.inf if remaining_ms is None else float(remaining_ms)
    slack = effective_slack(config, load)
    best = row[0] - price * cost[0]  # "none": always feasible
    scores = [best]
    for j in range(1, p):
        if ok[j] and slack * ms[j] <= left:
            score = row[j] - price * cost[j]
            if score > best:
                best = score
        else:
            score = -math.inf
        scores.append(score)
    tie = _quality_tie(priority, config, prior, load)
    good = best - tie
    if tie > _TIE:  # quality with a prior: the tied plan more accurate on validation, then the cheaper
        assert prior is not None
        top = max(prior[j] for j in range(p) if scores[j] >= good) - _TIE
        scores = [s if s >= good and prior[j] >= top else -math.inf for j, s in enumerate(scores)]
    # among equally good plans, the cheapest; the first of equal costs (argmin's rule)
    index, low = 0, math.inf
    for j in range(p):
        if scores[j] >= good and cost[j] < low:
            index, low = j, cost[j]
    ptie = _plan_tie(priority, config, prior, load)
    if index > 0 and ptie > _TIE:  # which follow-up: the tied one more accurate on validation, then the cheaper
        assert prior is not None
        near = max(scores[1:]) - ptie
        top = max(prior[j] for j in range(1, p) if scores[j] >= near) - _TIE
        index, low = 0, math.inf
        for j in range(1, p):
            if scores[j] >= near and prior[j] >= top and cost[j] < low:
                index, low = j, cost[j]
    if priority is Priority.SPEED and row[index] - row[0] < config.speed_tolerance - _TIE:
        index = 0
    return index, row[index]
