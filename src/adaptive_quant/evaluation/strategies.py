"""Routing strategies on recorded outcomes: ONE model for single-stage and two-stage routing.

A *route* is what one sample goes through: an entry pass and, optionally, a follow-up ("int8",
"fp32", "int8+int8:hflip", the single-stage cascade's "int8→fp32"). Single-stage routing is
two-stage routing with no follow-up. `Outcomes` holds, per sample and route, whether the route
answered right and how long it took, and per route what it costs; every strategy chooses a route
per sample and `Outcomes.score` prices that choice as a `StrategyPoint`:

  fixed       every sample on one route (a variant alone, or the entry followed by one plan)
  confidence  the entry route, escalated to a follow-up route where the entry's top softmax
              probability is below a threshold (the single-stage INT8→FP32 cascade is one)
  random      the same escalation for a random share of samples (the same rate, no choice of who)
  oracle      the cheapest route that is right (needs the labels: a ceiling)
  adaptive    the production policy (policies.py): `route_batch` picks the entry variant,
              `plan_followups` the follow-up, as the gateway does
Pure NumPy, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from adaptive_quant.core.stats import percentile

# the one vocabulary of `StrategyPoint.strategy`, in both reports
FIXED, CONFIDENCE, RANDOM, ORACLE, ADAPTIVE, HTTP = "fixed", "confidence", "random", "oracle", "adaptive", "http"


@dataclass
class StrategyPoint:
    """One configuration on the accuracy/cost plane."""

    strategy: str  # FIXED, CONFIDENCE, RANDOM, ORACLE, ADAPTIVE (over HTTP: HTTP)
    label: str  # short human name, e.g. "adaptive balanced @ 2.1 ms", "int8+int8:hflip"
    accuracy: float  # share of samples answered right
    mean_ms: float  # ms per sample, mean of the modelled per-sample latency
    p99_ms: float  # ms, 99th percentile of the same
    within_budget: float | None  # share of samples whose latency ≤ budget (None: no budget)
    throughput: float  # samples/s at batch 64 (see `mixed_throughput`); NaN when not measured
    mix: dict[str, float]  # share of samples per answering variant (or route, where no variants are given)
    compute: float | None = None  # mean compute per sample, in entry passes (1.0 = the entry alone); None: not counted
    escalated: float = 0.0  # share of samples that got a follow-up
    budget_ms: float | None = None
    priority: str | None = None
    param: float | None = None  # the knob that produced this point: threshold, price, …
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


@dataclass
class Outcomes:
    """What every strategy is priced on: per sample and route, right or wrong and how long it took;
    per route, what it runs and costs. The defaults describe single-stage routes (each column one
    variant alone); `then` adds a route with a follow-up, `two_stage.Recorded.outcomes` builds
    the entry-plus-plan routes."""

    keys: list[str]  # route of each column
    correct: np.ndarray  # (N, R) bool: route r answered sample i right
    latency: np.ndarray  # (N, R) ms per sample and route; a (R,) per-route latency is broadcast
    throughput: np.ndarray | None = None  # (V,) samples/s at batch 64 per variant; None: not measured (NaN)
    share_budgets: Sequence[float] = ()  # ms: each point records its share of samples within these
    variants: list[str] | None = None  # what `work`, `throughput` and the mix count in; default: keys
    answer: list[str] | None = None  # (R,) the variant whose answer route r returns; default: keys
    work: np.ndarray | None = None  # (R, V) passes of each variant that route r runs; default: its answer's, once
    compute: np.ndarray | None = None  # (R,) compute per sample, in entry passes; None: not counted
    followup: np.ndarray | None = None  # (R,) bool: route r runs a follow-up; default: none does

    def __post_init__(self) -> None:
        r = len(self.keys)
        self.correct = np.asarray(self.correct, dtype=bool)
        self.latency = np.asarray(self.latency, dtype=np.float64)
        if self.latency.ndim == 1:
            self.latency = np.broadcast_to(self.latency, self.correct.shape)
        if self.latency.shape != self.correct.shape or self.correct.shape[1] != r:
            raise ValueError(
                f"correct {self.correct.shape} and latency {self.latency.shape} must both be (samples, {r} routes)"
            )
        self.variants = list(self.keys) if self.variants is None else list(self.variants)
        self.answer = list(self.keys) if self.answer is None else list(self.answer)
        if self.work is None:  # each route runs the variant that answers it, once
            self.work = np.zeros((r, len(self.variants)))
            self.work[np.arange(r), [self.variants.index(a) for a in self.answer]] = 1.0
        self.followup = np.zeros(r, dtype=bool) if self.followup is None else np.asarray(self.followup, dtype=bool)
        if self.compute is not None:
            self.compute = np.asarray(self.compute, dtype=np.float64)

    @property
    def samples(self) -> int:
        return int(self.correct.shape[0])

    def column(self, key: str) -> int:
        return self.keys.index(key)

    def then(self, first: str, second: str) -> Outcomes:
        """These outcomes plus the route "first→second": `first` runs, then `second`, whose answer
        replaces the first's (the single-stage cascade). It pays both latencies and both passes."""
        a, b = self.column(first), self.column(second)

        def add(m: np.ndarray, row: object) -> np.ndarray:  # m with one row (or element) more
            return np.concatenate([m, np.asarray(row)[None]])

        return Outcomes(
            keys=[*self.keys, f"{first}→{second}"],
            correct=np.column_stack([self.correct, self.correct[:, b]]),
            latency=np.column_stack([self.latency, self.latency[:, a] + self.latency[:, b]]),
            throughput=self.throughput,
            share_budgets=self.share_budgets,
            variants=self.variants,
            answer=[*self.answer, self.answer[b]],
            work=add(self.work, self.work[a] + self.work[b]),
            compute=None if self.compute is None else add(self.compute, self.compute[a] + self.compute[b]),
            followup=add(self.followup, True),
        )

    def score(self, choice: np.ndarray, strategy: str, label: str, **kwargs) -> StrategyPoint:
        """Price the route chosen per sample, choice (N,) column indices. kwargs: StrategyPoint
        fields (budget_ms sets within_budget: the share of samples whose latency is within it)."""
        budget_ms = kwargs.pop("budget_ms", None)
        choice = np.asarray(choice, dtype=np.int64)
        rows = np.arange(len(choice))
        ms = self.latency[rows, choice]
        answer_col = np.array([self.variants.index(a) for a in self.answer])
        mix = np.bincount(answer_col[choice], minlength=len(self.variants)) / max(1, len(choice))
        work = self.work[choice].mean(axis=0) if len(choice) else np.zeros(len(self.variants))
        return StrategyPoint(
            strategy=strategy,
            label=label,
            accuracy=float(self.correct[rows, choice].mean()),
            mean_ms=float(ms.mean()),
            p99_ms=percentile(ms, 99),
            within_budget=None if budget_ms is None else float((ms <= budget_ms).mean()),
            throughput=float("nan") if self.throughput is None else mixed_throughput(work, self.throughput),
            mix={k: float(s) for k, s in zip(self.variants, mix)},
            compute=None if self.compute is None else float(self.compute[choice].mean()),
            escalated=float(self.followup[choice].mean()),
            budget_ms=budget_ms,
            within_by_budget={f"{b:g}": float((ms <= b).mean()) for b in self.share_budgets},
            **kwargs,
        )


def fixed_points(
    o: Outcomes, columns: Sequence[str] | None = None, served: Sequence[str] | None = None, label: str = "fixed {key}"
) -> list[StrategyPoint]:
    """Every sample on one route, for each of `columns` (default all); one not in `served` is a
    baseline (not deployable). `label` is formatted with the route's key."""
    out = []
    for k in o.keys if columns is None else columns:
        is_served = served is None or k in served
        name = label.format(key=k) + ("" if is_served else " (baseline, not served)")
        out.append(o.score(np.full(o.samples, o.column(k)), FIXED, name, deployable=is_served))
    return out


def cascade_points(
    o: Outcomes, confidence: np.ndarray, base: str, up: str, thresholds: Sequence[float], label: str
) -> list[StrategyPoint]:
    """Route `base`, escalated to route `up` where `confidence` (N,) (the entry's top softmax
    probability) is below a threshold: one point per threshold. `label` is formatted with t."""
    b, u = o.column(base), o.column(up)
    return [o.score(np.where(confidence < t, u, b), CONFIDENCE, label.format(t=t), param=float(t)) for t in thresholds]


def confidence_at_rate(
    o: Outcomes, confidence: np.ndarray, base: str, up: str, rate: float, label: str
) -> StrategyPoint:
    """The confidence rule escalating exactly the `rate` least confident samples (equal-rate comparisons)."""
    choice = np.full(o.samples, o.column(base))
    choice[np.argsort(confidence, kind="stable")[: int(round(rate * o.samples))]] = o.column(up)
    return o.score(choice, CONFIDENCE, label, param=rate)


def random_escalation(
    o: Outcomes, base: str, up: str, rate: float, label: str, seed: int = 0, draws: int = 50
) -> StrategyPoint:
    """Escalate a random `rate` share of samples from `base` to `up`: accuracy is the mean over
    `draws` seeded draws (latency and compute are the same for every draw but for jitter)."""
    rng = np.random.default_rng(seed)
    n, k = o.samples, int(round(rate * o.samples))
    rows = np.arange(n)
    choices = []
    for _ in range(draws):
        choice = np.full(n, o.column(base))
        choice[rng.choice(n, k, replace=False)] = o.column(up)
        choices.append(choice)
    point = o.score(choices[0], RANDOM, label, param=rate)
    point.accuracy = float(np.mean([o.correct[rows, c].mean() for c in choices]))
    return point


def random_assignment(o: Outcomes, index: np.ndarray, seed: int = 0, draws: int = 50) -> float:
    """Accuracy when the routes of `index` (N,) are given to randomly chosen samples: the same
    escalation rate and route mix, hence the same compute, without the policy's choice of who gets
    them (mean over `draws` seeded shuffles)."""
    rng = np.random.default_rng(seed)
    rows = np.arange(len(index))
    return float(np.mean([o.correct[rows, rng.permutation(index)].mean() for _ in range(draws)]))


def oracle_point(
    o: Outcomes, columns: Sequence[str] | None = None, label: str = "oracle (knows the labels)"
) -> StrategyPoint:
    """Knows the answers: per sample the cheapest of `columns` (default all) that is right, the
    cheapest of all when none is. Cheapest by compute where counted, else by mean latency."""
    cost = o.latency.mean(axis=0) if o.compute is None else o.compute
    cols = np.array([o.column(k) for k in (o.keys if columns is None else columns)])
    cols = cols[np.argsort(cost[cols], kind="stable")]  # cheapest first
    right = o.correct[:, cols]
    first = np.where(right.any(axis=1), right.argmax(axis=1), 0)
    return o.score(cols[first], ORACLE, label, deployable=False)
