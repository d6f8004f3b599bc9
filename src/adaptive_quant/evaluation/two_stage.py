"""One split's recorded pass outputs, as the routes two-stage routing chooses between.

`Recorded` holds the softmax of every pass (the entry, each plan's follow-up passes, each served
variant) and turns them into `strategies.Outcomes`: column j is the entry followed by plan j
(column 0, plan "none", the entry alone), then each other served variant alone. Compute is
counted in entry passes (1.0 = the entry alone); latency is the passes' batch-1 times added up.
Every strategy of `strategies.py` and the gateway's planner (`policies.router_points`) is then
priced on the same outcomes, so the comparison is fair.
Pure NumPy on arrays; the caller (two_stage_report.py, router_cv.py) runs the passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from adaptive_quant.core.plans import NONE, Plan
from adaptive_quant.core.stats import softmax
from adaptive_quant.evaluation.strategies import Outcomes
from adaptive_quant.predictor.calibration import auroc

# the budget sweep's idle one-image budgets, × the entry pass's time: from "only the entry fits"
# (1.05×) past the most expensive plan here (fp32:hflip + the entry ≈ 4-5×)
BUDGET_FACTORS = (1.05, 1.5, 2.0, 2.5, 3.5, 5.0, 7.0)


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

    def plan_index(self, name: str) -> int:
        """The column of plan `name` ("none" is 0)."""
        return [p.name for p in self.plans].index(name)

    def route(self, j: int) -> str:
        """Plan j as a route: the entry alone ("int8"), or the entry followed by the plan ("int8+int8:hflip")."""
        return f"{self.entry}+{self.plans[j].name}" if j else self.entry

    def confidence(self) -> np.ndarray:
        """(N,) the entry's top softmax probability: what the plain confidence rule reads."""
        return self.probs[self.entry].max(1)

    def outcomes(self, variants: Sequence[str] = ()) -> Outcomes:
        """The routes as `Outcomes`: column j = `route(j)` for every plan, then each of `variants`
        alone (the entry's own variant is column 0). Compute in entry passes, latency in ms."""
        ok = self.correct()
        cost, ms = self.extra_cost(), self.extra_ms()
        entry_ms = self.pass_ms[self.entry]
        keys = [self.route(j) for j in range(len(self.plans))]
        cols, compute, latency = [ok], list(1.0 + cost), list(entry_ms + ms)
        for v in variants:
            if v != self.entry:
                keys.append(v)
                cols.append((self.probs[v].argmax(1) == self.labels)[:, None])
                compute.append(self.pass_cost[v])
                latency.append(self.pass_ms[v])
        followup = [j > 0 for j in range(len(self.plans))] + [False] * (len(keys) - len(self.plans))
        return Outcomes(keys, np.hstack(cols), np.array(latency), compute=np.array(compute), followup=followup)


def fixed_choices(rec: Recorded, served: Sequence[str]) -> dict[str, tuple[float, float, bool]]:
    """Every fixed choice a budget is compared with: name → (accuracy, idle one-image ms, is a
    plan). Each served variant alone, and the entry followed by each plan for every sample
    ("int8+int8:hflip")."""
    ok = rec.correct()
    entry_ms = rec.pass_ms[rec.entry]
    ms = rec.extra_ms()
    out = {v: (float((rec.probs[v].argmax(1) == rec.labels).mean()), rec.pass_ms[v], False) for v in served}
    for j in range(1, len(rec.plans)):
        out[rec.route(j)] = (float(ok[:, j].mean()), entry_ms + ms[j], True)
    return out


def fixed_right(rec: Recorded, served: Sequence[str]) -> dict[str, np.ndarray]:
    """Every fixed choice of `fixed_choices`, by the same name → (N,) bool: right on sample i."""
    o = rec.outcomes(served)
    column = dict(zip(o.keys, o.correct.T))
    return {k: column[k] for k in fixed_choices(rec, served)}


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


def followup_auroc(rec: Recorded, pred_acc: np.ndarray, plan: str) -> dict[str, float]:
    """AUROC for "this plan turns a wrong entry answer right": learned gain vs the confidence rule."""
    j = rec.plan_index(plan)
    ok = rec.correct()
    fixes = ok[:, j] & ~ok[:, 0]
    return {
        "learned": auroc(pred_acc[:, j] - pred_acc[:, 0], fixes),
        "confidence": auroc(-rec.confidence(), fixes),
        "fixes": int(fixes.sum()),
        "breaks": int((ok[:, 0] & ~ok[:, j]).sum()),
    }
