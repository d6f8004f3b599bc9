"""The evaluation report's arithmetic: pure functions from raw predictions and timings to numbers and text.

No I/O, no ONNX Runtime: `evaluation.py` measures, this module counts.

- `classification_metrics`: accuracy, macro precision/recall/F1, a per-class table, the confusion matrix
- `score_choice`: one routing strategy's point (accuracy, mean/p99 latency, share within budget,
  variant mix, modelled throughput) from the variant it chose per sample
- `pareto_mask`: which points no other point beats on both axes
- `verdict`: a plain-language paragraph saying which configuration to run for which budget
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# ----------------------------------------------------------------------------- classification


@dataclass
class ClassMetrics:
    name: str
    precision: float  # share of predictions of this class that were right (0 when never predicted)
    recall: float  # share of this class's samples predicted as it (0 when the class is absent)
    f1: float
    support: int  # samples of this class


@dataclass
class ClassificationMetrics:
    accuracy: float
    macro_precision: float  # unweighted mean over classes
    macro_recall: float
    macro_f1: float
    per_class: list[ClassMetrics]
    confusion: list[list[int]]  # [true class][predicted class] counts
    samples: int


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    if labels.shape != predicted.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predicted.shape} differ in shape")
    return np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def classification_metrics(labels: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> ClassificationMetrics:
    """Everything the per-variant section reports, from true and predicted class ids (N,)."""
    c = len(classes)
    cm = confusion_matrix(labels, predicted, c)
    tp = np.diag(cm).astype(np.float64)
    predicted_n = cm.sum(axis=0).astype(np.float64)  # per class: how often it was predicted
    support = cm.sum(axis=1)
    # 0/0 → 0: a class never predicted has no precision to speak of (sklearn's zero_division=0)
    precision = np.divide(tp, predicted_n, out=np.zeros(c), where=predicted_n > 0)
    recall = np.divide(tp, support, out=np.zeros(c), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(c), where=denom > 0)
    n = int(support.sum())
    return ClassificationMetrics(
        accuracy=float(tp.sum() / n) if n else float("nan"),
        macro_precision=float(precision.mean()),
        macro_recall=float(recall.mean()),
        macro_f1=float(f1.mean()),
        per_class=[
            ClassMetrics(classes[i], float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
            for i in range(c)
        ],
        confusion=cm.tolist(),
        samples=n,
    )


# ----------------------------------------------------------------------------- routing points


@dataclass
class StrategyPoint:
    """One configuration on the accuracy/latency plane."""

    strategy: str  # "fixed", "adaptive", "random-same-mix", "oracle", "cascade"
    label: str  # short human name, e.g. "adaptive balanced @ 2.1 ms"
    accuracy: float  # share of samples answered right
    mean_ms: float  # ms per sample, mean of the modelled per-sample latency
    p99_ms: float  # ms, 99th percentile of the same
    within_budget: float | None  # share of samples whose latency ≤ budget (None: no budget)
    throughput: float  # samples/s at batch 64 (see `mixed_throughput`)
    mix: dict[str, float]  # share of samples per variant key
    budget_ms: float | None = None
    priority: str | None = None
    param: float | None = None  # cascade threshold, …
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
    throughput: np.ndarray,
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
    latency of sample i on variant v; throughput: (V,) samples/s at batch 64.
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
        p99_ms=float(np.percentile(ms, 99)),
        within_budget=None if budget_ms is None else float((ms <= budget_ms).mean()),
        throughput=mixed_throughput(work, throughput),
        mix={k: float(s) for k, s in zip(keys, mix)},
        budget_ms=budget_ms,
        within_by_budget={f"{b:g}": float((ms <= b).mean()) for b in share_budgets},
        **kwargs,
    )


# ----------------------------------------------------------------------------- Pareto frontier


def pareto_mask(gain: Sequence[float], cost: Sequence[float]) -> np.ndarray:
    """(N,) bool: points that no other point dominates (gain to maximise, cost to minimise).

    q dominates p when gain_q ≥ gain_p and cost_q ≤ cost_p with at least one strict. Exact
    duplicates do not dominate each other, so all copies of a frontier point are on it (the
    report names every configuration that achieves it). NaN points are never on the frontier.
    For "more is better" on both axes (accuracy vs throughput) pass cost = −throughput.
    """
    g = np.asarray(gain, np.float64)
    c = np.asarray(cost, np.float64)
    if g.shape != c.shape or g.ndim != 1:
        raise ValueError(f"gain and cost must be 1-D of one length, got {g.shape} and {c.shape}")
    valid = np.isfinite(g) & np.isfinite(c)
    # O(N²) pairwise: report sweeps have tens of points
    ge = g[None, :] >= g[:, None]  # [p, q]: q at least as good as p in gain
    le = c[None, :] <= c[:, None]
    strict = (g[None, :] > g[:, None]) | (c[None, :] < c[:, None])
    dominated = (ge & le & strict & valid[None, :]).any(axis=1)
    return valid & ~dominated


# ----------------------------------------------------------------------------- verdict


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


MIN_WITHIN = 0.95  # share of samples a configuration must finish within a budget to "meet" it (the
# router plans with p95 estimates, so 95% is what a budget promises)


def recommend(
    points: Sequence[StrategyPoint], budgets: Sequence[float | None], min_within: float = MIN_WITHIN
) -> list[tuple[float | None, StrategyPoint | None]]:
    """For each budget (ms; None = none), the most accurate deployable point that meets it.

    A point meets budget B when at least `min_within` of its samples finish within B (a routed
    point at B: its measured share; an unbudgeted point: its share recorded at B, else p99 ≤ B).
    Ties in accuracy go to the lower mean latency. None when nothing meets B.
    """
    out = []
    for b in budgets:
        ok = []
        for p in points:
            if not p.deployable:
                continue
            if b is None:
                if p.budget_ms is None:
                    ok.append(p)
                continue
            if p.budget_ms is not None and p.budget_ms != b:
                continue  # a routed point answers its own budget only
            if p.budget_ms == b and p.within_budget is not None:
                share = p.within_budget
            else:
                share = p.within_by_budget.get(f"{b:g}", float(p.p99_ms <= b))
            if share >= min_within:
                ok.append(p)
        best = max(ok, key=lambda p: (round(p.accuracy, 9), -p.mean_ms)) if ok else None
        out.append((b, best))
    return out


def verdict(
    fixed: Sequence[StrategyPoint],
    adaptive: Sequence[StrategyPoint],
    random_mix: Sequence[StrategyPoint],
    cascade: Sequence[StrategyPoint],
    oracle: StrategyPoint | None,
    budgets: Sequence[float | None],
    reference: str = "fp32",
) -> str:
    """One paragraph, plain language, every claim a number from the points given."""
    served = [p for p in fixed if p.deployable]
    if not served:
        return "No served variant was measured, so there is nothing to recommend."
    parts: list[str] = []
    ref = next((p for p in fixed if p.mix.get(reference) == 1.0), max(served, key=lambda p: p.accuracy))
    fastest = min(served, key=lambda p: p.mean_ms)
    parts.append(
        f"{ref.label} answers {_pct(ref.accuracy)} of the test samples right at {ref.mean_ms:.3g} ms per sample "
        f"(p99 {ref.p99_ms:.3g} ms, batch 1); the fastest variant, {fastest.label}, takes {fastest.mean_ms:.3g} ms "
        f"({ref.mean_ms / fastest.mean_ms:.1f}× faster) at {_pct(fastest.accuracy)}"
        f" ({100 * (fastest.accuracy - ref.accuracy):+.2f} points)."
        if fastest is not ref
        else f"{ref.label} answers {_pct(ref.accuracy)} of the test samples right at {ref.mean_ms:.3g} ms per sample (p99 {ref.p99_ms:.3g} ms)."
    )
    ptq = [p for p in fixed if not p.deployable and "ptq" in p.label]
    qat = next((p for p in served if p.mix.get("int8") == 1.0), None)
    if ptq and qat:
        d = 100 * (qat.accuracy - ptq[0].accuracy)
        parts.append(
            f"Quantization-aware training {'gains' if d >= 0 else 'loses'} {abs(d):.2f} points against post-training INT8 quantization ({_pct(qat.accuracy)} vs {_pct(ptq[0].accuracy)})."
        )
    # recommendations per budget, merged into ranges of equal choice
    recs = recommend([*served, *adaptive, *cascade], budgets)
    ranges: list[tuple[str | None, list[float], StrategyPoint | None]] = []  # (choice, budgets, its point)
    for b, p in recs:
        if b is None:
            continue
        name = p.label.split(" @ ")[0] if p is not None else None  # "adaptive balanced @ 2 ms" → the configuration
        if ranges and ranges[-1][0] == name:
            ranges[-1][1].append(b)
        else:
            ranges.append((name, [b], p))
    sentences = []
    for name, bs, p in ranges:
        span = f"{bs[0]:.3g} ms" if len(bs) == 1 else f"{bs[0]:.3g}–{bs[-1]:.3g} ms"
        if name is None or p is None:
            sentences.append(
                f"at {span} nothing keeps 95% of samples within budget (the service then answers "
                "with the fastest variant and reports the budget as missed)"
            )
        else:
            sentences.append(f"at {span} run {name} ({_pct(p.accuracy)}, {p.mean_ms:.3g} ms mean)")
    if sentences:
        parts.append("Per latency budget: " + "; ".join(sentences) + ".")
    none_rec = next((p for b, p in recs if b is None), None)
    if none_rec is not None:
        parts.append(
            f"Without a budget, {none_rec.label.split(' @ ')[0]} is the most accurate choice ({_pct(none_rec.accuracy)}, {none_rec.mean_ms:.3g} ms mean)."
        )
    # does the predictor earn its keep? adaptive vs random assignment at the same mix
    pairs = [(a, r) for a, r in zip(adaptive, random_mix) if max(a.mix.values()) < 0.999]
    if not random_mix:
        pass  # no random baseline measured (HTTP mode): nothing to say about the predictor's worth
    elif pairs:
        gains = np.array([a.accuracy - r.accuracy for a, r in pairs])
        verb = "beats" if gains.mean() > 0.0005 else ("trails" if gains.mean() < -0.0005 else "matches")
        parts.append(
            f"Where adaptive routing mixes variants ({len(pairs)} sweep points), it {verb} random assignment at the same mix by "
            f"{100 * gains.mean():+.2f} points on average (best {100 * gains.max():+.2f}), "
            + (
                "so the per-sample predictor adds accuracy at no latency cost."
                if verb == "beats"
                else "so the per-sample predictor does not pay here; the mix alone explains the result."
            )
        )
    else:
        parts.append(
            "Adaptive routing never mixed variants in this sweep (each budget and priority sent every sample to one variant), so it reduces to a fixed precision per budget."
        )
    if cascade:
        best_c = max(cascade, key=lambda p: (p.accuracy, -p.mean_ms))
        parts.append(
            f"The INT8→FP32 confidence cascade reaches at best {_pct(best_c.accuracy)} at {best_c.mean_ms:.3g} ms mean ({best_c.label})."
        )
    if oracle is not None:
        parts.append(
            f"An oracle that knew which variant is right would reach {_pct(oracle.accuracy)} at {oracle.mean_ms:.3g} ms: the ceiling for any router over these variants."
        )
    return " ".join(parts)
