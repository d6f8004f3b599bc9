"""K-fold cross-validation of the two-stage router on the validation split.

The router is fitted on the validation split, so the split cannot also say how well it routes,
nor choose the planner's settings: the test split must not either. Cross-validation can:
  1. cut the validation samples into K folds (seeded); per fold, fit the router (the same
     `fit_deferral` as the exporter) on the other K − 1 folds and predict the held-out one, and
     take the plans' accuracies on those K − 1 folds as the prior that breaks quality's ties;
  2. on the pooled out-of-fold predictions, run the gateway's planner (`router_choice`, idle, one
     image per request) for balanced, and for quality at every candidate `quality_tie` under every
     budget of the report's sweep;
  3. score each tie by its worst budget: quality's accuracy minus the fixed variant or plan whose
     time fits that budget and that a deployment without routing would ship. The target is a floor
     ("never below a fixed choice that fits"), so the tie chosen is the one whose worst budget is
     best; equal worst cases go to the smaller tie, which spends less compute.
Two comparators are reported. The pooled one, the best fixed choice on the very samples it is scored
on, is picked in hindsight: the max of a dozen noisy accuracies, it beats any rule that has to choose
(by 0.1-0.2 points on 5,000 images). The nested one (`selected_fixed`) picks, per fold, the fixed
choice that fits and is most accurate on the other folds and scores it on the held-out fold: chosen
the way the router and its settings are, it is what the tie is chosen against.
Pure NumPy on recorded outputs; `cli/fit_router.py --cross-validate` runs the passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adaptive_quant.core.planner import PlannerConfig
from adaptive_quant.core.routing import Priority
from adaptive_quant.evaluation.policies import router_choice
from adaptive_quant.evaluation.strategies import confidence_at_rate
from adaptive_quant.evaluation.two_stage import (
    BUDGET_FACTORS,
    Recorded,
    best_within,
    fixed_choices,
    fixed_right,
    flip_plan,
)
from adaptive_quant.predictor.fit_deferral import DeferralFitConfig, fit_deferral

# candidate quality_tie values, in predicted accuracy (0.01 = one point); 1.0 ties every plan
TIES = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 1.0)
# candidate planner.followup_price values for balanced: predicted accuracy per entry pass of extra compute
PRICES = (0.0, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02)


@dataclass
class OutOfFold:
    pred: np.ndarray  # (N, P) each sample's p(right | plan) from the router fitted without its fold
    fold: np.ndarray  # (N,) fold of each sample
    priors: np.ndarray  # (K, P) the plans' accuracies on the other folds (column 0: the entry alone)


@dataclass
class CrossValidation:
    folds: int
    samples: int
    ties: list[dict[str, Any]]  # per tie: per budget quality vs the best fixed choice that fits; worst
    chosen_tie: float
    balanced: dict[str, Any] = field(default_factory=dict)  # balanced vs the confidence rule, same rate
    repeats: int = 1  # fold assignments (seeds) averaged over
    # balanced per candidate followup_price: accuracy, escalated share, compute (× the entry pass)
    prices: list[dict[str, Any]] = field(default_factory=list)


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """(n,) fold of each sample: a seeded permutation cut into `folds` near-equal parts."""
    if folds < 2 or folds > n:
        raise ValueError(f"folds must be between 2 and the number of samples ({n}); got {folds}")
    out = np.empty(n, dtype=np.int64)
    out[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return out


def out_of_fold(rec: Recorded, folds: int = 5, seed: int = 0, fit_config: DeferralFitConfig | None = None) -> OutOfFold:
    """Fit the router K times, each without one fold, and predict that fold (step 1 of the module doc)."""
    ok = rec.correct()
    n, p = ok.shape
    fold = fold_ids(n, folds, seed)
    pred = np.empty((n, p), np.float32)
    priors = np.empty((folds, p))
    names = [plan.name for plan in rec.plans]
    for k in range(folds):
        train, held = fold != k, fold == k
        predictor, _ = fit_deferral(rec.entry_logits[train], ok[train], names, fit_config)
        pred[held] = predictor.predict(rec.entry_logits[held])
        priors[k] = ok[train].mean(0)
    return OutOfFold(pred=pred, fold=fold, priors=priors)


def choices(
    rec: Recorded, oof: OutOfFold, priority: Priority, config: PlannerConfig, budget_ms: float | None
) -> np.ndarray:
    """(N,) the planner's plan per sample, each fold planned with its own prior."""
    index = np.zeros(len(rec.labels), dtype=np.int64)
    for k, prior in enumerate(oof.priors):
        held = oof.fold == k  # the planner decides each row alone: plan only the fold's own rows
        index[held] = router_choice(rec, oof.pred[held], priority, config, budget_ms, prior.tolist())
    return index


def selected_fixed(
    table: Mapping[str, tuple[float, float, bool]],
    right: Mapping[str, np.ndarray],
    entry: str,
    fold: np.ndarray,
    budget_ms: float | None,
) -> tuple[float, list[str]]:
    """The nested comparator (module doc): per fold, the fixed choice of `table` (`fixed_choices`)
    whose time fits `budget_ms` (None: any) that is most accurate on the other folds, scored on the
    fold itself with `right` (`fixed_right`); returns the pooled accuracy and each fold's pick. The
    entry alone when nothing fits; ties go to the first in the table's order."""
    limit = np.inf if budget_ms is None else budget_ms
    names = [k for k, (_, t, _) in table.items() if t <= limit] or [entry]
    answered = np.zeros(len(fold), dtype=bool)
    picks = []
    for k in np.unique(fold):
        held = fold == k
        best = max(names, key=lambda n: right[n][~held].mean())
        answered[held] = right[best][held]
        picks.append(best)
    return float(answered.mean()), picks


def cross_validate(
    rec: Recorded,
    served: Sequence[str],
    folds: int = 5,
    seed: int = 0,
    planner: PlannerConfig | None = None,
    ties: Sequence[float] = TIES,
    factors: Sequence[float] = BUDGET_FACTORS,
    fit_config: DeferralFitConfig | None = None,
    repeats: int = 1,
    prices: Sequence[float] = (),
) -> CrossValidation:
    """Steps 1-3 of the module doc on one split's recorded outputs (the validation split's),
    `repeats` times with fold seeds seed, seed + 1, …: the figures are means over the repeats."""
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1; got {repeats}")
    planner = planner or PlannerConfig()
    ok = rec.correct()
    rows = np.arange(len(rec.labels))
    entry_ms = rec.pass_ms[rec.entry]
    budgets: list[float | None] = [None] + [entry_ms * f for f in factors]
    table = fixed_choices(rec, served)
    right = fixed_right(rec, served)  # once: the nested comparator scores every budget and repeat on it
    fixed = [best_within(table, np.inf if b is None else b, rec.entry) for b in budgets]
    cost = rec.extra_cost()
    flip = flip_plan(rec)
    o, up = rec.outcomes(), rec.route(rec.plan_index(flip))
    # (repeat, tie, budget) → quality's accuracy, escalation, compute; (repeat,) → balanced's
    q = np.zeros((repeats, len(ties), len(budgets), 3))
    selected = np.zeros((repeats, len(budgets)))  # (repeat, budget) → the nested comparator's accuracy
    bal = np.zeros((repeats, 4))
    swept = np.zeros((repeats, len(prices), 3))  # (repeat, price) → balanced's accuracy, rate, compute
    for r in range(repeats):
        oof = out_of_fold(rec, folds, seed + r, fit_config)
        selected[r] = [selected_fixed(table, right, rec.entry, oof.fold, b)[0] for b in budgets]
        for t, tie in enumerate(ties):
            cfg = planner.model_copy(update={"quality_tie": float(tie)})
            for b, budget in enumerate(budgets):
                index = choices(rec, oof, Priority.QUALITY, cfg, budget)
                q[r, t, b] = (ok[rows, index].mean(), (index > 0).mean(), 1.0 + cost[index].mean())
        index = choices(rec, oof, Priority.BALANCED, planner, None)
        rate = float((index > 0).mean())
        at = f"{flip} @{rate:.1%}"
        conf = confidence_at_rate(o, rec.confidence(), rec.entry, up, rate, at).accuracy if 0 < rate < 1 else np.nan
        bal[r] = (ok[rows, index].mean(), rate, 1.0 + cost[index].mean(), conf)
        for i, price in enumerate(prices):
            cfg = planner.model_copy(update={"followup_price": float(price)})
            index = choices(rec, oof, Priority.BALANCED, cfg, None)
            swept[r, i] = (ok[rows, index].mean(), (index > 0).mean(), 1.0 + cost[index].mean())
    mean = q.mean(0)
    per_tie = []
    for t, tie in enumerate(ties):
        gaps = 100 * (q[:, t, :, 0] - np.array([a for _, a in fixed])[None, :])  # (repeat, budget) points
        nested = 100 * (q[:, t, :, 0] - selected)  # (repeat, budget) points against the nested comparator
        points = [
            {
                "budget_ms": budget,
                "quality_acc": float(mean[t, b, 0]),
                "escalated": float(mean[t, b, 1]),
                "compute": float(mean[t, b, 2]),
                "best_fixed": fixed[b][0],
                "best_fixed_acc": fixed[b][1],
                "gap_points": float(gaps[:, b].mean()),
                "selected_fixed_acc": float(selected[:, b].mean()),
                "gap_vs_selected_points": float(nested[:, b].mean()),
            }
            for b, budget in enumerate(budgets)
        ]
        worst = gaps.min(1)  # per repeat, its worst budget
        per_tie.append(
            {
                "quality_tie": float(tie),
                "budgets": points,
                "worst_gap_points": float(worst.mean()),
                "worst_gap_range": [float(worst.min()), float(worst.max())],
                "worst_gap_vs_selected_points": float(nested.min(1).mean()),
            }
        )
    # the best mean worst case against the nested comparator; among equal ones (to 1e-9) the smallest tie
    top = max(t["worst_gap_vs_selected_points"] for t in per_tie)
    chosen = min(t["quality_tie"] for t in per_tie if t["worst_gap_vs_selected_points"] >= top - 1e-9)
    b = bal.mean(0)
    balanced = {
        "accuracy": float(b[0]),
        "escalated": float(b[1]),
        "compute": float(b[2]),
        "confidence_plan": flip,
        "confidence_acc": None if np.isnan(b[3]) else float(b[3]),
        "per_repeat_gain_points": [float(100 * (a - c)) for a, c in zip(bal[:, 0], bal[:, 3])],
    }
    # the comparator for balanced: the best served variant alone, of any network and precision
    variant, variant_acc = max(((k, a) for k, (a, _, plan) in table.items() if not plan), key=lambda kv: kv[1])
    by_price = [
        {
            "followup_price": float(price),
            "accuracy": float(a),
            "escalated": float(e),
            "compute": float(c),
            "best_variant": variant,
            "gain_points": float(100 * (a - variant_acc)),
        }
        for price, (a, e, c) in zip(prices, swept.mean(0))
    ]
    return CrossValidation(
        folds=folds,
        samples=len(rows),
        ties=per_tie,
        chosen_tie=chosen,
        balanced=balanced,
        repeats=repeats,
        prices=by_price,
    )
