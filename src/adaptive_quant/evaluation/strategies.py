"""Offline routing strategies on recorded predictions: the one place each strategy is written.

Given, per test sample and variant, whether the variant answered right and how long it took
(`Outcomes`), each strategy chooses a variant per sample and `score_choice` prices that choice
as a `StrategyPoint` (accuracy, mean/p99 latency, share within budget, mix, throughput).

- fixed: every sample to one variant
- adaptive: the production policy, through `core.routing.route_batch` (what the gateway runs,
  so the offline figures describe production behaviour)
- oracle: the cheapest variant that is right (needs the labels: a ceiling)
- cascade: the cheap variant first, the expensive one when its top softmax probability is low

Used by the evaluation report (`offline.py`). Pure NumPy, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from adaptive_quant.core.routing import Priority, RoutingConfig, allowed_mask, route_batch
from adaptive_quant.core.stats import max_softmax, percentile

CASCADE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # cheap top-1 softmax below this → ask the expensive one


@dataclass
class StrategyPoint:
    """One configuration on the accuracy/latency plane."""

    strategy: str  # "fixed", "adaptive", "oracle", "cascade" (over HTTP: "http")
    label: str  # short human name, e.g. "adaptive balanced @ 2.1 ms"
    accuracy: float  # share of samples answered right
    mean_ms: float  # ms per sample, mean of the modelled per-sample latency
    p99_ms: float  # ms, 99th percentile of the same
    within_budget: float | None  # share of samples whose latency ≤ budget (None: no budget)
    throughput: float  # samples/s at batch 64 (see `mixed_throughput`); NaN when not measured
    mix: dict[str, float]  # share of samples per variant key
    budget_ms: float | None = None
    priority: str | None = None
    param: float | None = None  # the knob that produced this point: cascade threshold, …
    deployable: bool = True  # False for the oracle (needs labels) and non-served baselines
    on_latency_frontier: bool = False
    on_throughput_frontier: bool = False
    # share of samples within each sweep budget (key f"{budget:g}" ms), for points without their own budget
    within_by_budget: dict[str, float] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)


def mixed_throughput(shares: np.ndarray, throughput: np.ndarray) -> float:
    """Samples/s when a share s_v of the samples goes to variant v, each at its own batch-64 throughput.

    The variants share the same cores and run one after the other, so the time per sample adds
    up: 1 / Σ_v s_v / thr_v (a harmonic mean). `shares` may sum to more than 1 (a cascade runs
    the cheap variant on every sample and the expensive one on some).
    """
    shares = np.asarray(shares, np.float64)
    throughput = np.asarray(throughput, np.float64)
    used = shares > 0
    seconds = float((shares[used] / throughput[used]).sum())
    return 1.0 / seconds if seconds > 0 else float("inf")


def score_choice(
    choice: np.ndarray,
    correct: np.ndarray,
    latency: np.ndarray,
    throughput: np.ndarray | None,
    keys: Sequence[str],
    budget_ms: float | None,
    strategy: str,
    label: str,
    extra_latency: np.ndarray | None = None,
    extra_share: np.ndarray | None = None,
    share_budgets: Sequence[float] = (),
    **kwargs,
) -> StrategyPoint:
    """Price a strategy from the column it chose per sample.

    choice: (N,) int column per sample; correct: (N, V) bool; latency: (N, V) ms, the modelled
    latency of sample i on variant v; throughput: (V,) samples/s at batch 64 (None: not measured).
    extra_latency (N,) ms and extra_share (V,) add work that is not the answering variant's,
    e.g. the cascade's cheap pass on escalated samples. share_budgets: budgets (ms) at which
    to record the share of samples within them (for recommending an unbudgeted point).
    """
    rows = np.arange(len(choice))
    ms = latency[rows, choice]
    if extra_latency is not None:
        ms = ms + extra_latency
    mix = np.bincount(choice, minlength=len(keys)) / max(1, len(choice))
    work = mix + (extra_share if extra_share is not None else 0.0)
    return StrategyPoint(
        strategy=strategy,
        label=label,
        accuracy=float(correct[rows, choice].mean()),
        mean_ms=float(ms.mean()),
        p99_ms=percentile(ms, 99),
        within_budget=None if budget_ms is None else float((ms <= budget_ms).mean()),
        throughput=float("nan") if throughput is None else mixed_throughput(work, throughput),
        mix={k: float(s) for k, s in zip(keys, mix)},
        budget_ms=budget_ms,
        within_by_budget={f"{b:g}": float((ms <= b).mean()) for b in share_budgets},
        **kwargs,
    )


@dataclass
class Outcomes:
    """What every strategy is priced on: per sample and variant, right or wrong, and how long it took."""

    keys: list[str]  # variant key of each column
    correct: np.ndarray  # (N, V) bool: variant v classified sample i right
    latency: np.ndarray  # (N, V) ms per sample and variant; a (V,) per-variant latency is broadcast
    throughput: np.ndarray | None = None  # (V,) samples/s at batch 64; None: not measured (NaN in points)
    share_budgets: Sequence[float] = ()  # ms: each point records its share of samples within these

    def __post_init__(self) -> None:
        self.latency = np.asarray(self.latency, dtype=np.float64)
        if self.latency.ndim == 1:
            self.latency = np.broadcast_to(self.latency, self.correct.shape)
        if self.latency.shape != self.correct.shape or self.correct.shape[1] != len(self.keys):
            raise ValueError(
                f"correct {self.correct.shape} and latency {self.latency.shape} must both be "
                f"(samples, {len(self.keys)} variants)"
            )

    @property
    def samples(self) -> int:
        return int(self.correct.shape[0])

    def score(self, choice: np.ndarray, strategy: str, label: str, **kwargs) -> StrategyPoint:
        """`score_choice` on these outcomes (kwargs: budget_ms, extra_latency, StrategyPoint fields)."""
        budget_ms = kwargs.pop("budget_ms", None)
        return score_choice(
            choice,
            self.correct,
            self.latency,
            self.throughput,
            self.keys,
            budget_ms,
            strategy,
            label,
            share_budgets=self.share_budgets,
            **kwargs,
        )


def fixed_points(o: Outcomes, served: Sequence[str] | None = None) -> list[StrategyPoint]:
    """Every sample to one variant, for each variant; one not in `served` is a baseline (not deployable)."""
    out = []
    for j, k in enumerate(o.keys):
        is_served = served is None or k in served
        label = f"fixed {k}" if is_served else f"fixed {k} (baseline, not served)"
        out.append(o.score(np.full(o.samples, j), "fixed", label, deployable=is_served))
    return out


def adaptive_point(
    o: Outcomes,
    pred_acc: np.ndarray,
    estimates_ms: np.ndarray,
    precisions: Sequence[str],
    budget_ms: float | None,
    priority: Priority,
    config: RoutingConfig,
    columns: Sequence[int] | None = None,
    label: str | None = None,
    param: float | None = None,
) -> StrategyPoint:
    """Route every sample with the production policy; score the chosen variant's recorded answer.

    pred_acc (N, S) p(correct) and estimates_ms (S,) are over the routable variants, which are
    the columns `columns` of the outcomes (default: all of them, in order).
    """
    decision = route_batch(pred_acc, estimates_ms, allowed_mask(precisions, None), budget_ms, priority, config)
    choice = decision.index if columns is None else np.asarray(columns)[decision.index]  # → outcome column
    if label is None:
        where = "no budget" if budget_ms is None else f"{budget_ms:.3g} ms"
        label = f"adaptive {priority.value} @ {where}"
    return o.score(
        choice,
        "adaptive",
        label,
        budget_ms=budget_ms,
        priority=priority.value,
        param=param,
        extra={"router_budget_met": float(decision.budget_met.mean())},
    )


def oracle_point(o: Outcomes, columns: Sequence[int] | None = None, cost_ms: np.ndarray | None = None) -> StrategyPoint:
    """Knows the answers: per sample the cheapest of `columns` (default all) that is right, the
    cheapest of all when none is. Cheapest by `cost_ms` (V,), default each variant's mean latency."""
    cost = o.latency.mean(axis=0) if cost_ms is None else np.asarray(cost_ms)
    cols = np.arange(len(o.keys)) if columns is None else np.asarray(columns)
    cols = cols[np.argsort(cost[cols])]  # cheapest first
    right = o.correct[:, cols]
    first = np.where(right.any(axis=1), right.argmax(axis=1), 0)
    return o.score(cols[first], "oracle", "oracle (knows the labels)", deployable=False)


def cascade_points(
    o: Outcomes, cheap_logits: np.ndarray, cheap: str, expensive: str, thresholds: Sequence[float]
) -> list[StrategyPoint]:
    """Run `cheap`; escalate to `expensive` when its top softmax probability is under a threshold,
    one point per threshold. An escalated sample pays both latencies (the cheap answer had to be
    computed to know), and the cheap variant's work counts in the throughput."""
    c, e = o.keys.index(cheap), o.keys.index(expensive)
    confidence = max_softmax(cheap_logits)  # (N,) top-1 probability of the cheap answer
    out = []
    for thr in thresholds:
        escalate = confidence < thr
        extra_share = np.zeros(len(o.keys))
        extra_share[c] = escalate.mean()  # escalated samples ran on the cheap variant first
        out.append(
            o.score(
                np.where(escalate, e, c),
                "cascade",
                f"cascade {cheap}→{expensive} (threshold {thr:g})",
                param=thr,
                extra_latency=escalate * o.latency[:, c],
                extra_share=extra_share,
            )
        )
    return out
