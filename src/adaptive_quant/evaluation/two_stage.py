"""Offline evaluation of two-stage routing: entry pass, then follow-up plans, on recorded outputs.

Every strategy is priced on the same recorded pass outputs of one split, so the comparison is
fair: accuracy against mean compute (in entry passes: 1.0 = INT8 alone) and escalation rate.
  fixed variant   every sample on one variant, one pass (int8, fp16, fp32)
  fixed plan      every sample gets the same follow-up plan
  confidence      escalate to one plan when the entry's max probability < t (the plain rule)
  random          escalate a random share of samples to the same plan (same rate as the router)
  router          `core.planner.plan_followups` on the router predictor's output: the very
                  function the gateway runs, per priority and price, and under latency budgets
  oracle          a sample is right if any plan gets it right (the ceiling for any router)
Pure NumPy on arrays; the caller (cli/evaluate.py, or a study) runs the passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from adaptive_quant.core.planner import PlannerConfig, plan_followups
from adaptive_quant.core.plans import NONE, Plan
from adaptive_quant.core.routing import Priority
from adaptive_quant.core.stats import softmax
from adaptive_quant.predictor.calibration import auroc

# the budget sweep's idle one-image budgets, × the entry pass's time: from "only the entry fits"
# (1.05×) past the most expensive plan here (fp32:hflip + the entry ≈ 4-5×)
BUDGET_FACTORS = (1.05, 1.5, 2.0, 2.5, 3.5, 5.0, 7.0)


@dataclass(frozen=True)
class TwoStagePoint:
    strategy: str  # "fixed variant", "fixed plan", "confidence", "random", "router", "oracle"
    name: str  # e.g. "int8", "int8:hflip", "t=0.6", "balanced price=0.01"
    accuracy: float  # share right
    compute: float  # mean compute per sample, in entry passes (1.0 = the entry variant alone)
    escalated: float  # share of samples that got a follow-up
    latency_ms: float | None = None  # mean modelled latency per sample (budget sweeps), ms


@dataclass
class Recorded:
    """One split's recorded outputs: everything the strategies need."""

    labels: np.ndarray  # (N,)
    entry: str  # entry pass name, e.g. "int8"
    probs: dict[str, np.ndarray]  # pass name ("int8", "int8:hflip", "fp32", ...) → (N, C) softmax
    plans: list[Plan]  # column order of the router; plans[0] is "none"
    pass_cost: dict[str, float]  # pass name → compute in entry passes
    pass_ms: dict[str, float]  # pass name → latency, ms (batch 1 p50: the idle gateway's estimate)
    entry_logits: np.ndarray  # (N, C) the entry pass's logits: what the router reads

    @classmethod
    def from_logits(
        cls,
        labels: np.ndarray,
        entry: str,
        logits: Mapping[str, np.ndarray],
        plan_names: Sequence[str],
        pass_ms: Mapping[str, float],
    ) -> Recorded:
        plans = [Plan.parse(n) for n in plan_names]
        if plans[0].name != NONE:
            raise ValueError(f"the first plan must be {NONE!r}, got {plan_names[0]!r}")
        entry_ms = pass_ms[entry]
        return cls(
            labels=np.asarray(labels),
            entry=entry,
            probs={k: softmax(v) for k, v in logits.items()},
            plans=plans,
            pass_cost={k: v / entry_ms for k, v in pass_ms.items()},
            pass_ms=dict(pass_ms),
            entry_logits=np.asarray(logits[entry]),
        )

    def plan_probs(self, j: int) -> np.ndarray:
        """(N, C) the answer of plan j: mean of the entry's and the plan's passes' probabilities."""
        parts = [self.probs[self.entry]] + [self.probs[p.name] for p in self.plans[j].passes]
        return np.mean(parts, axis=0)

    def correct(self) -> np.ndarray:
        """(N, P) bool: plan j's answer is right on sample i (column 0 = entry alone)."""
        return np.stack([self.plan_probs(j).argmax(1) == self.labels for j in range(len(self.plans))], axis=1)

    def extra_cost(self) -> np.ndarray:
        """(P,) extra compute of each plan, in entry passes."""
        return np.array([sum(self.pass_cost[p.name] for p in plan.passes) for plan in self.plans])

    def extra_ms(self) -> np.ndarray:
        """(P,) extra latency of each plan (its passes one after the other on shared cores), ms."""
        return np.array([sum(self.pass_ms[p.name] for p in plan.passes) for plan in self.plans])


def fixed_choices(rec: Recorded, served: Sequence[str]) -> dict[str, tuple[float, float, bool]]:
    """Every fixed choice a budget is compared with: name → (accuracy, idle one-image ms, is a
    plan). Each served variant alone, and the entry followed by each plan for every sample
    ("int8+int8:hflip")."""
    ok = rec.correct()
    entry_ms = rec.pass_ms[rec.entry]
    ms = rec.extra_ms()
    out = {v: (float((rec.probs[v].argmax(1) == rec.labels).mean()), rec.pass_ms[v], False) for v in served}
    for j, plan in enumerate(rec.plans[1:], start=1):
        out[f"{rec.entry}+{plan.name}"] = (float(ok[:, j].mean()), entry_ms + ms[j], True)
    return out


def best_within(fixed: Mapping[str, tuple[float, float, bool]], budget_ms: float, entry: str) -> tuple[str, float]:
    """The most accurate of `fixed_choices` whose time fits `budget_ms`; the entry alone when none does."""
    fits = {k: a for k, (a, t, _) in fixed.items() if t <= budget_ms}
    if not fits:
        return entry, fixed[entry][0]
    best = max(fits, key=fits.__getitem__)
    return best, fits[best]


def flip_plan(rec: Recorded) -> str:
    """The plan the confidence rule and random escalation are compared on: the entry's own flip
    when the router has it, else its first follow-up."""
    return next((p.name for p in rec.plans[1:] if p.name == f"{rec.entry}:hflip"), rec.plans[1].name)


def _point(strategy: str, name: str, rec: Recorded, ok: np.ndarray, choice: np.ndarray, **kw) -> TwoStagePoint:
    cost = rec.extra_cost()
    return TwoStagePoint(
        strategy=strategy,
        name=name,
        accuracy=float(ok[np.arange(len(choice)), choice].mean()),
        compute=float(1.0 + cost[choice].mean()),
        escalated=float((choice > 0).mean()),
        **kw,
    )


def fixed_variants(rec: Recorded, variants: Sequence[str]) -> list[TwoStagePoint]:
    """Every sample on one variant alone (no entry pass underneath)."""
    out = []
    for v in variants:
        acc = float((rec.probs[v].argmax(1) == rec.labels).mean())
        out.append(TwoStagePoint("fixed variant", v, acc, rec.pass_cost[v], 0.0))
    return out


def fixed_plans(rec: Recorded) -> list[TwoStagePoint]:
    ok = rec.correct()
    n = len(rec.labels)
    return [
        _point("fixed plan", f"{rec.entry}+{p.name}" if j else rec.entry, rec, ok, np.full(n, j))
        for j, p in enumerate(rec.plans)
    ]


def confidence_cascade(rec: Recorded, plan: str, thresholds: Sequence[float]) -> list[TwoStagePoint]:
    """Escalate to `plan` where the entry's max probability < t."""
    j = [p.name for p in rec.plans].index(plan)
    ok = rec.correct()
    conf = rec.probs[rec.entry].max(1)
    return [_point("confidence", f"{plan} t={t:g}", rec, ok, np.where(conf < t, j, 0)) for t in thresholds]


def confidence_at_rate(rec: Recorded, plan: str, rate: float) -> TwoStagePoint:
    """The confidence rule escalating exactly the `rate` least confident samples (equal-rate comparisons)."""
    j = [p.name for p in rec.plans].index(plan)
    ok = rec.correct()
    n = len(rec.labels)
    choice = np.zeros(n, dtype=np.int64)
    choice[np.argsort(rec.probs[rec.entry].max(1), kind="stable")[: int(round(rate * n))]] = j
    return _point("confidence", f"{plan} @{rate:.1%}", rec, ok, choice)


def random_escalation(rec: Recorded, plan: str, rate: float, seed: int = 0, draws: int = 50) -> TwoStagePoint:
    """Escalate a random `rate` share of samples to `plan` (mean over `draws` seeded draws)."""
    j = [p.name for p in rec.plans].index(plan)
    ok = rec.correct()
    n = len(rec.labels)
    rng = np.random.default_rng(seed)
    accs = []
    for _ in range(draws):
        choice = np.zeros(n, dtype=np.int64)
        choice[rng.choice(n, int(round(rate * n)), replace=False)] = j
        accs.append(ok[np.arange(n), choice].mean())
    cost = rec.extra_cost()[j]
    return TwoStagePoint("random", f"{plan} @{rate:.1%}", float(np.mean(accs)), 1.0 + cost * rate, rate)


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
) -> list[TwoStagePoint]:
    """`router_choice` per priority × price × budget, scored on the recorded outcomes."""
    ok = rec.correct()
    ms = rec.extra_ms()
    entry_ms = rec.pass_ms[rec.entry]
    out = []
    for budget in budgets_ms:
        for priority in priorities:
            for price in prices if priority is not Priority.QUALITY else prices[:1]:
                cfg = config.model_copy(update={"followup_price": price})
                index = router_choice(rec, pred_acc, priority, cfg, budget, prior)
                label = priority.value if priority is Priority.QUALITY else f"{priority.value} price={price:g}"
                if budget is not None:
                    label += f" budget={budget:g}ms"
                latency = float(entry_ms + ms[index].mean())
                out.append(_point("router", label, rec, ok, index, latency_ms=latency))
    return out


def random_assignment(rec: Recorded, index: np.ndarray, seed: int = 0, draws: int = 50) -> float:
    """Accuracy when the same plans as `index` (N,) are given to randomly chosen samples: the same
    escalation rate and plan mix, hence the same compute, without the router's choice of who gets
    them (mean over `draws` seeded shuffles)."""
    ok = rec.correct()
    rng = np.random.default_rng(seed)
    rows = np.arange(len(index))
    return float(np.mean([ok[rows, rng.permutation(index)].mean() for _ in range(draws)]))


def oracle(rec: Recorded) -> TwoStagePoint:
    """Right if any plan is right; the cheapest right plan's compute (entry alone where it is right)."""
    ok = rec.correct()
    cost = rec.extra_cost()
    any_ok = ok.any(1)
    cheapest = np.where(ok, cost[None, :], np.inf).argmin(1)
    choice = np.where(any_ok, cheapest, 0)
    return TwoStagePoint(
        "oracle", "any plan", float(any_ok.mean()), float(1 + cost[choice].mean()), float((choice > 0).mean())
    )


def followup_auroc(rec: Recorded, pred_acc: np.ndarray, plan: str) -> dict[str, float]:
    """AUROC for "this plan turns a wrong entry answer right": learned gain vs the confidence rule."""
    j = [p.name for p in rec.plans].index(plan)
    ok = rec.correct()
    fixes = ok[:, j] & ~ok[:, 0]
    return {
        "learned": auroc(pred_acc[:, j] - pred_acc[:, 0], fixes),
        "confidence": auroc(-rec.probs[rec.entry].max(1), fixes),
        "fixes": int(fixes.sum()),
        "breaks": int((ok[:, 0] & ~ok[:, j]).sum()),
    }
