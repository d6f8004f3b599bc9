"""The production routing policies, priced offline: the very functions the gateway runs.

Both choose a route per sample of `strategies.Outcomes` and score it there, like every other
strategy; they differ only in which stage they decide:
  adaptive_point  single-stage: `core.routing.route_batch` picks the entry variant (no follow-up)
  router_points   two-stage: `core.planner.plan_followups` picks the follow-up plan after the
                  entry pass, on the router predictor's output, per priority, price and budget
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adaptive_quant.core.planner import PlannerConfig, plan_followups
from adaptive_quant.core.routing import Priority, RoutingConfig, allowed_mask, route_batch
from adaptive_quant.evaluation.strategies import ADAPTIVE, Outcomes, StrategyPoint
from adaptive_quant.evaluation.two_stage import Recorded


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
    """Route every sample with the single-stage policy; score the chosen variant's recorded answer.

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
        ADAPTIVE,
        label,
        budget_ms=budget_ms,
        priority=priority.value,
        param=param,
        extra={"router_budget_met": float(decision.budget_met.mean())},
    )


def router_choice(
    rec: Recorded,
    pred_acc: np.ndarray,
    priority: Priority,
    config: PlannerConfig,
    budget_ms: float | None = None,
    prior: Sequence[float] | None = None,
) -> np.ndarray:
    """(N,) the plan column the gateway's planner gives each sample of one-image requests on an idle
    server (load 0) under `budget_ms` (None: no budget), every plan allowed.

    `prior`: the plans' validation accuracies (Manifest.plan_accuracies), as the gateway passes
    them: they break quality's ties. Never the recorded split's own accuracies."""
    remaining = None if budget_ms is None else budget_ms - rec.pass_ms[rec.entry]
    allowed = np.ones(len(rec.plans), dtype=bool)
    d = plan_followups(pred_acc, rec.extra_cost(), rec.extra_ms(), allowed, remaining, priority, config, 0.0, prior)
    return d.index


def router_points(
    rec: Recorded,
    pred_acc: np.ndarray,
    priorities: Sequence[Priority],
    prices: Sequence[float],
    config: PlannerConfig,
    budgets_ms: Sequence[float | None] = (None,),
    prior: Sequence[float] | None = None,
    outcomes: Outcomes | None = None,
) -> list[StrategyPoint]:
    """`router_choice` per priority × price × budget, scored on `outcomes` (default `rec.outcomes()`,
    whose first columns are the plans)."""
    o = rec.outcomes() if outcomes is None else outcomes
    out = []
    for budget in budgets_ms:
        for priority in priorities:
            for price in prices if priority is not Priority.QUALITY else prices[:1]:
                cfg = config.model_copy(update={"followup_price": price})
                index = router_choice(rec, pred_acc, priority, cfg, budget, prior)
                label = priority.value if priority is Priority.QUALITY else f"{priority.value} price={price:g}"
                if budget is not None:
                    label += f" budget={budget:g}ms"
                out.append(
                    o.score(index, ADAPTIVE, label, budget_ms=budget, priority=priority.value, param=float(price))
                )
    return out
