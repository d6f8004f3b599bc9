"""The evaluation report's arithmetic: pure functions from raw predictions and strategy points to numbers and text.

No I/O, no ONNX Runtime: `offline.py` measures, `strategies.py` prices the routing strategies,
this module counts and concludes.

- `classification_metrics`: accuracy, macro precision/recall/F1, a per-class table, the confusion matrix
- `pareto_mask`, `mark_frontiers`: which points no other point beats on both axes
- `recommend`, `verdict`: a plain-language paragraph saying which configuration to run for which
  budget; one verdict for both reports (a report with follow-ups passes its `FollowupFacts`)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adaptive_quant.evaluation.strategies import ADAPTIVE, CONFIDENCE, FIXED, HTTP, ORACLE, StrategyPoint

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


def mark_frontiers(points: Sequence[StrategyPoint]) -> None:
    """Set on_*_frontier over the deployable points (the oracle and non-served baselines are references)."""
    cand = [p for p in points if p.deployable]
    acc = [p.accuracy for p in cand]
    lat_mask = pareto_mask(acc, [p.mean_ms for p in cand])
    thr_mask = pareto_mask(acc, [-p.throughput for p in cand])
    for p, a, b in zip(cand, lat_mask, thr_mask):
        p.on_latency_frontier, p.on_throughput_frontier = bool(a), bool(b)


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


@dataclass
class FollowupFacts:
    """What a report with follow-ups adds to the verdict: the deployed router against the fixed choices."""

    default: StrategyPoint  # balanced at the default price: what the gateway runs
    best_fixed: StrategyPoint  # the most accurate variant alone
    best_plan: StrategyPoint  # the most accurate fixed route from the entry (the entry alone included)
    quality: StrategyPoint  # X-Priority: quality, no budget
    followup_price: float
    equal_rate: list[dict[str, Any]] = field(default_factory=list)  # router vs confidence vs random, same rate
    budgets: list[dict[str, Any]] = field(default_factory=list)  # the budget sweep's rows
    targets: dict[str, Any] = field(default_factory=dict)


def verdict(
    points: Sequence[StrategyPoint],
    budgets: Sequence[float | None] = (),
    reference: str = "fp32",
    followups: FollowupFacts | None = None,
) -> str:
    """One paragraph, plain language, every claim a number from the points given: the fixed
    variants, the routed configurations (per latency budget in `budgets`, ms; None = none), the
    follow-ups where `followups` is given, the confidence rule and the oracle."""
    fixed = [p for p in points if p.strategy == FIXED and p.escalated == 0]
    served = [p for p in fixed if p.deployable]
    if not served:
        return "No served variant was measured, so there is nothing to recommend."
    parts = _fixed_sentences(fixed, served, reference)
    if followups is not None:
        parts += _followup_sentences(followups)
    adaptive = [p for p in points if p.strategy in (ADAPTIVE, HTTP)]
    cascade = [p for p in points if p.strategy == CONFIDENCE]
    if budgets:
        parts += _budget_sentences(recommend([*served, *adaptive, *cascade], budgets))
    # single-stage routing on each variant's validation accuracy is the same for every sample, so
    # every point sends all samples to one variant: say what that amounts to
    if followups is None and adaptive and all(max(p.mix.values()) >= 0.999 for p in adaptive):
        parts.append(
            "Adaptive routing never mixed variants in this sweep (each budget and priority sent every sample to one variant), so it reduces to a fixed precision per budget."
        )
    if cascade:
        best_c = max(cascade, key=lambda p: (p.accuracy, -p.mean_ms))
        parts.append(
            f"The confidence rule reaches at best {_pct(best_c.accuracy)} at {best_c.mean_ms:.3g} ms mean ({best_c.label})."
        )
    oracle = next((p for p in points if p.strategy == ORACLE), None)
    if oracle is not None:
        parts.append(
            f"An oracle that knew which route is right would reach {_pct(oracle.accuracy)} at {oracle.mean_ms:.3g} ms: the ceiling for any router over these routes."
        )
    return " ".join(parts)


def _fixed_sentences(fixed: list[StrategyPoint], served: list[StrategyPoint], reference: str) -> list[str]:
    """The reference variant against the fastest one, and QAT against the PTQ baseline."""
    ref = next((p for p in served if p.mix.get(reference) == 1.0), max(served, key=lambda p: p.accuracy))
    fastest = min(served, key=lambda p: p.mean_ms)
    tail = f" (p99 {ref.p99_ms:.3g} ms, batch 1)" if ref.p99_ms > ref.mean_ms else " (batch 1)"
    opening = (
        f"{ref.label} answers {_pct(ref.accuracy)} of the test samples right at {ref.mean_ms:.3g} ms per sample{tail}"
    )
    if fastest is ref:
        parts = [opening + "."]
    else:
        parts = [
            f"{opening}; the fastest variant, {fastest.label}, takes {fastest.mean_ms:.3g} ms "
            f"({ref.mean_ms / fastest.mean_ms:.1f}× faster) at {_pct(fastest.accuracy)}"
            f" ({100 * (fastest.accuracy - ref.accuracy):+.2f} points)."
        ]
    ptq = [p for p in fixed if not p.deployable and "ptq" in p.label]
    qat = next((p for p in served if p.mix.get("int8") == 1.0), None)
    if ptq and qat:
        d = 100 * (qat.accuracy - ptq[0].accuracy)
        parts.append(
            f"Quantization-aware training {'gains' if d >= 0 else 'loses'} {abs(d):.2f} points against post-training INT8 quantization ({_pct(qat.accuracy)} vs {_pct(ptq[0].accuracy)})."
        )
    return parts


def _budget_sentences(recs: list[tuple[float | None, StrategyPoint | None]]) -> list[str]:
    """`recommend`'s choices, merged into ranges of budgets with the same choice."""
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
    parts = ["Per latency budget: " + "; ".join(sentences) + "."] if sentences else []
    none_rec = next((p for b, p in recs if b is None), None)
    if none_rec is not None:
        parts.append(
            f"Without a budget, {none_rec.label.split(' @ ')[0]} is the most accurate choice ({_pct(none_rec.accuracy)}, {none_rec.mean_ms:.3g} ms mean)."
        )
    return parts


def _followup_sentences(f: FollowupFacts) -> list[str]:
    """The deployed router against the best fixed variant and plan, the confidence rule and random
    escalation at its own rate, and `quality` under every budget of the sweep."""
    d, q, t = f.default, f.quality, f.targets
    parts = [
        f"Two-stage routing (balanced, default price {f.followup_price:g}) answers {_pct(d.accuracy)} at "
        f"{d.compute:.2f}× the entry pass's compute, escalating {d.escalated:.1%} of samples: "
        f"{100 * (d.accuracy - f.best_fixed.accuracy):+.2f} points over the best fixed variant "
        f"({f.best_fixed.label}, {_pct(f.best_fixed.accuracy)}). `quality` answers {_pct(q.accuracy)} at "
        f"{q.compute:.2f}×, {100 * (q.accuracy - f.best_plan.accuracy):+.2f} points against the most accurate "
        f"fixed plan ({f.best_plan.label}, {_pct(f.best_plan.accuracy)} at {f.best_plan.compute:.2f}×)."
    ]
    eq = next((r for r in f.equal_rate if r["router"] == d.label), None)
    if eq is not None:
        diff = 100 * (eq["router_acc"] - eq["confidence_acc"])
        word = "beats" if diff > 0.1 else "trails" if diff < -0.1 else "ties"
        parts.append(
            f"At its escalation rate ({eq['rate']:.1%}) the learned router {word} the plain confidence rule "
            f"({_pct(eq['router_acc'])} vs {_pct(eq['confidence_acc'])}, {diff:+.2f} points) and beats random "
            f"escalation ({_pct(eq['random_acc'])})."
        )
    if f.budgets:
        worst = min(f.budgets, key=lambda b: b["quality_acc"] - b["best_fixed_acc"])
        gap = 100 * (worst["quality_acc"] - worst["best_fixed_acc"])
        plannable = min(b["quality_acc"] - b["best_plannable_acc"] for b in f.budgets)
        parts.append(
            f"Under budgets ({len(f.budgets)} from {f.budgets[0]['budget_ms']:.2f} to "
            f"{f.budgets[-1]['budget_ms']:.2f} ms), `quality` is at worst {gap:+.2f} points against the best "
            f"fixed choice whose time fits ({worst['best_fixed']} at {worst['budget_ms']:.2f} ms) and at worst "
            f"{100 * plannable:+.2f} against the best one the planner could plan there (its margin × a "
            f"follow-up's time within what the entry leaves); "
            f"{'never below' if t.get('budgets_met_random') else 'not always above'} random assignment of the "
            f"same plans at the same rate."
        )
        if "quality_ci95" in worst:
            low, high = worst["quality_ci95"]
            parts.append(
                f"That worst gap's 95 % paired interval over the images is {low:+.2f} to {high:+.2f} points: "
                + ("a loss beyond the noise." if high < 0 else "within the noise of this split.")
            )
        scored = [b for b in f.budgets if b.get("best_validated_acc") is not None]
        if scored:
            low_v = min(scored, key=lambda b: b["quality_acc"] - b["best_validated_acc"])
            parts.append(
                f"Against the fixed choice that fits and was best on validation (what a deployment without "
                f"routing would ship), `quality` is at worst "
                f"{100 * (low_v['quality_acc'] - low_v['best_validated_acc']):+.2f} points "
                f"({low_v['best_validated']} at {low_v['budget_ms']:.2f} ms)."
            )
    return parts
