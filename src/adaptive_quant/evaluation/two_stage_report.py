"""The two-stage routing report: run the passes on the test split (and on corrupted validation
copies) and price every strategy on the recorded routes; render.py writes two_stage.md / .json
and the plot, report.verdict says what it means.

Compute is counted in entry passes (1.0 = INT8 alone); latency per pass is the batch-1 p50
measured on this host by the main evaluation (or the manifest's profile when not given).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adaptive_quant.core.corruptions import CORRUPTIONS, corrupt
from adaptive_quant.core.images import to_model_input
from adaptive_quant.core.manifest import load_manifest
from adaptive_quant.core.planner import PlannerConfig, effective_slack
from adaptive_quant.core.plans import Pass, Plan, View
from adaptive_quant.core.routing import Priority
from adaptive_quant.core.stats import paired_difference
from adaptive_quant.data import Split
from adaptive_quant.evaluation.policies import router_choice, router_points
from adaptive_quant.evaluation.report import FollowupFacts, verdict
from adaptive_quant.evaluation.strategies import (
    ADAPTIVE,
    StrategyPoint,
    cascade_points,
    confidence_at_rate,
    fixed_points,
    oracle_point,
    random_assignment,
    random_escalation,
)
from adaptive_quant.evaluation.two_stage import (
    BUDGET_FACTORS,
    Recorded,
    best_within,
    fixed_choices,
    fixed_right,
    flip_plan,
    followup_auroc,
)
from adaptive_quant.export.plans import pass_logits
from adaptive_quant.predictor.calibration import expected_calibration_error
from adaptive_quant.predictor.deferral import DeferralPredictor

log = logging.getLogger(__name__)

PRICES = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1)  # accuracy share per entry pass of extra compute
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # confidence cascade: escalate when max prob < t


@dataclass
class TwoStageReport:
    meta: dict[str, Any]
    points: list[StrategyPoint]  # test split, no budget (random: at the balanced router's rates)
    equal_rate: list[dict[str, float]]  # router vs confidence vs random at the router's escalation rates
    auroc: dict[str, dict[str, float]]  # plan → "follow-up turns a wrong answer right": learned vs confidence
    budgets: list[dict[str, Any]]  # per budget: router accuracy, best fixed choice that fits
    shift: list[dict[str, Any]] = field(default_factory=list)  # per corruption of the validation split
    # the cheap entry (X-Priority: speed) with its own router, against the main entry alone: rows of
    # _cheap_entry; empty without a speed router
    cheap_entry: list[dict[str, Any]] = field(default_factory=list)
    targets: dict[str, Any] = field(default_factory=dict)
    verdict: str = ""


def record_split(
    repo: Path, split: Split, manifest, router: DeferralPredictor, pass_ms, threads: int, entry: str | None = None
) -> Recorded:
    """Run the entry pass (default: the main router's), every pass of the router's plans and every
    served variant on `split`."""
    entry = entry or manifest.router["entry"]
    plans = [Plan.parse(p) for p in router.plan_names]
    needed = {Pass(entry)} | {p for plan in plans for p in plan.passes}
    needed |= {Pass(v.key, View.IDENTITY) for v in manifest.served_variants()}
    logits = pass_logits(repo, manifest, to_model_input(split.images, manifest.mean, manifest.std), needed, threads)
    ms = {p.name: pass_ms[p.variant] for p in needed}
    return Recorded.from_logits(split.labels, entry, {p.name: z for p, z in logits.items()}, router.plan_names, ms)


def evaluate_two_stage(
    repo: str | Path,
    test: Split,
    val: Split | None = None,
    pass_ms: dict[str, float] | None = None,
    threads: int = 0,
    seed: int = 0,
    planner: PlannerConfig | None = None,
) -> TwoStageReport:
    repo = Path(repo)
    manifest = load_manifest(repo)
    if not manifest.router:
        raise ValueError(f"{repo} has no router in its manifest: export it again, or run aq-fit-router")
    planner = planner or PlannerConfig()
    router = DeferralPredictor.load((repo / manifest.router["path"]).parent, sha256=manifest.router.get("sha256"))
    if pass_ms is None:  # the manifest's profile: the host it names may not be this one
        pass_ms = {k: v.latency.at(1).p50_ms for k, v in manifest.variants.items() if v.latency is not None}
    served = [v.key for v in manifest.served_variants()]
    rec = record_split(repo, test, manifest, router, pass_ms, threads)
    pred = router.predict(rec.entry_logits)
    # the plans' validation accuracies break quality's ties, as in the gateway (never the test split's)
    prior = manifest.plan_accuracies(router.plan_names)
    flip = flip_plan(rec)
    o = rec.outcomes(served)  # the plans' routes first, then each served variant alone
    plan_routes = [rec.route(j) for j in range(len(rec.plans))]
    alone = fixed_points(o, served, label="{key}")  # every served variant alone, one pass
    with_plan = fixed_points(o, plan_routes, label="{key}")  # [0] is the entry alone, as in `alone`
    conf = rec.confidence()
    # the confidence rule and random escalation send the same samples to one plan: the entry's own
    # flip, and the plan the default router escalates to most (with a second network, usually that
    # network's passes), so each is compared with the router on the plan it relies on
    chosen = router_choice(rec, pred, Priority.BALANCED, planner, None, prior)
    used = np.bincount(chosen, minlength=len(rec.plans))[1:]
    compare = [flip] + ([rec.plans[1 + int(used.argmax())].name] if used.any() else [])
    compare = list(dict.fromkeys(compare))  # the flip may be the router's favourite too
    points = alone + with_plan[1:]
    for plan in compare:
        up = rec.route(rec.plan_index(plan))
        points += cascade_points(o, conf, rec.entry, up, THRESHOLDS, label=f"{plan} t={{t:g}}")
    points += router_points(rec, pred, list(Priority), list(PRICES), planner, prior=prior, outcomes=o)
    points.append(oracle_point(o, plan_routes, label="any plan"))
    routed = [p for p in points if p.strategy == ADAPTIVE]
    default = next(p for p in routed if p.label == f"balanced price={planner.followup_price:g}")
    equal_rate = []
    for p in routed:
        if not (p.label.startswith("balanced") and 0 < p.escalated < 1):
            continue
        for plan in compare:
            up = rec.route(rec.plan_index(plan))
            at = f"{plan} @{p.escalated:.1%}"
            rule = confidence_at_rate(o, conf, rec.entry, up, p.escalated, label=at)
            rnd = random_escalation(o, rec.entry, up, p.escalated, label=at, seed=seed)
            points.append(rnd)
            equal_rate.append(
                {
                    "router": p.label,
                    "plan": plan,
                    "rate": p.escalated,
                    "router_acc": p.accuracy,
                    "router_compute": p.compute,
                    "confidence_acc": rule.accuracy,
                    "confidence_compute": rule.compute,
                    "random_acc": rnd.accuracy,
                }
            )
    auroc = {p.name: followup_auroc(rec, pred, p.name) for p in rec.plans[1:]}
    validated = {v.key: v.val_accuracy for v in manifest.served_variants()}
    if prior is not None:  # each plan's validation accuracy, under the name fixed_choices gives its route
        validated |= {rec.route(j): prior[j] for j in range(1, len(rec.plans))}
    budgets = _budget_sweep(rec, pred, planner, served, prior, seed, validated)
    shift = _shift(repo, val, manifest, router, pass_ms, threads, seed, planner, served) if val is not None else []
    cheap = _cheap_entry(repo, test, manifest, rec, pass_ms, threads, planner, seed)
    best_fixed = max(alone, key=lambda p: p.accuracy)
    best_plan = max(with_plan, key=lambda p: p.accuracy)
    quality = next(p for p in routed if p.label == "quality")
    targets = {
        "default_gain_points": 100 * (default.accuracy - best_fixed.accuracy),
        "default_compute": default.compute,
        "default_met": default.accuracy >= best_fixed.accuracy + 0.005 and default.compute <= 1.5,
        "quality_vs_best_plan_points": 100 * (quality.accuracy - best_plan.accuracy),
        "quality_met": quality.accuracy >= best_plan.accuracy - 0.001,
        # at every budget, X-Priority: quality against every fixed variant or plan that fits it
        "budgets_met_quality": all(b["quality_acc"] >= b["best_fixed_acc"] - 1e-12 for b in budgets),
        # the same against the fixed choices the planner itself would run under that budget (a
        # follow-up needs core.planner.effective_slack × its time left after the entry pass; 1× idle)
        "budgets_met_quality_plannable": all(b["quality_acc"] >= b["best_plannable_acc"] - 1e-12 for b in budgets),
        "budgets_met_balanced": all(b["router_acc"] >= b["best_fixed_acc"] - 1e-12 for b in budgets),
        # quality against the fixed choice that fits which was most accurate on validation: the one
        # a deployment without routing would have shipped (the best in hindsight is chosen on test)
        "budgets_met_quality_validated": all(
            b["quality_acc"] >= b["best_validated_acc"] - 1e-12 for b in budgets if b["best_validated"]
        ),
        # no budget where quality is below the best fixed choice in hindsight by more than the noise
        # of these images: the top of the 95 % paired interval of quality − best fixed is ≥ 0
        "budgets_no_significant_loss_quality": all(b["quality_ci95"][1] >= 0.0 for b in budgets),
        "budgets_met_random": all(
            b["quality_acc"] >= b["quality_random_acc"] - 1e-12 and b["router_acc"] >= b["router_random_acc"] - 1e-12
            for b in budgets
        ),
        "shift_met": all(s["adaptive_acc"] >= s["best_fixed_acc"] - 1e-12 for s in shift) if shift else None,
    }
    report = TwoStageReport(
        meta={
            "repository": str(repo),
            "samples": len(test.labels),
            "entry": rec.entry,
            "plans": router.plan_names[1:],
            "pass_ms": pass_ms,
            "followup_price": planner.followup_price,
            "router": manifest.router.get("kind"),
        },
        points=points,
        equal_rate=equal_rate,
        auroc=auroc,
        budgets=budgets,
        shift=shift,
        cheap_entry=cheap,
        targets=targets,
    )
    facts = FollowupFacts(
        default=default,
        best_fixed=best_fixed,
        best_plan=best_plan,
        quality=quality,
        equal_rate=equal_rate,
        budgets=budgets,
        targets=targets,
        followup_price=planner.followup_price,
    )
    report.verdict = verdict(points, followups=facts)
    return report


def _budget_sweep(
    rec: Recorded,
    pred: np.ndarray,
    planner: PlannerConfig,
    served: list[str],
    prior: list[float] | None,
    seed: int,
    validated: dict[str, float | None] | None = None,
) -> list[dict[str, Any]]:
    """Per budget (ms of one batch-1 request, idle server): balanced and quality against every fixed
    choice that fits (its modelled time within the budget), against the fixed choices the planner
    could itself plan there (effective_slack × the follow-up's time within what the entry leaves),
    and against random assignment of the same plans at the same rate.

    The best fixed choice that fits is the most accurate on the split scored here, chosen in
    hindsight; `validated` (fixed choice → its validation accuracy) also names the one a deployment
    without routing would have chosen, on validation, and scores it here. Quality's gap to each
    comes with a 95 % paired bootstrap interval over the images (core.stats.paired_difference)."""
    entry_ms = rec.pass_ms[rec.entry]
    ok = rec.correct()
    ms = rec.extra_ms()
    o = rec.outcomes()
    fixed = fixed_choices(rec, served)
    right = fixed_right(rec, served)  # each fixed choice's answers on these images
    validated = validated or {}
    rows = np.arange(len(rec.labels))
    out = []
    for factor in BUDGET_FACTORS:
        budget = entry_ms * factor
        row: dict[str, Any] = {"budget_ms": budget}
        answers = {}
        for key, priority in (("router", Priority.BALANCED), ("quality", Priority.QUALITY)):
            index = router_choice(rec, pred, priority, planner, budget, prior)
            answers[key] = ok[rows, index]
            row[f"{key}_acc"] = float(answers[key].mean())
            row[f"{key}_escalated"] = float((index > 0).mean())
            row[f"{key}_latency_ms"] = float(entry_ms + ms[index].mean())
            row[f"{key}_random_acc"] = random_assignment(o, index, seed=seed)
        # a plan runs after the entry pass: the planner needs its margin × its extra time left over (idle: 1×)
        plannable = {
            k: a
            for k, (a, t, is_plan) in fixed.items()
            if (entry_ms + effective_slack(planner, 0.0) * (t - entry_ms) <= budget if is_plan else k == rec.entry)
        }
        best, best_acc = best_within(fixed, budget, rec.entry)
        best_plannable = max(plannable, key=plannable.get)
        row |= {
            "best_fixed": best,
            "best_fixed_acc": best_acc,
            "best_plannable": best_plannable,
            "best_plannable_acc": plannable[best_plannable],
        }
        _, low, high = paired_difference(answers["quality"], right[best], seed=seed)
        row["quality_ci95"] = [low, high]
        fits = {k: validated[k] for k, (_, t, _) in fixed.items() if t <= budget and validated.get(k) is not None}
        chosen = max(fits, key=fits.__getitem__) if fits else None
        row["best_validated"] = chosen
        row["best_validated_acc"] = fixed[chosen][0] if chosen else None
        if chosen:
            diff, low, high = paired_difference(answers["quality"], right[chosen], seed=seed)
            row["quality_vs_validated_points"] = diff
            row["quality_vs_validated_ci95"] = [low, high]
        out.append(row)
    return out


def _shift(repo, val, manifest, router, pass_ms, threads, seed, planner, served) -> list[dict[str, Any]]:
    out = []
    for name in CORRUPTIONS:
        shifted = Split(corrupt(val.images, name, seed=seed), val.labels)
        rec = record_split(repo, shifted, manifest, router, pass_ms, threads)
        pred = router.predict(rec.entry_logits)
        [point] = router_points(rec, pred, [Priority.BALANCED], [planner.followup_price], planner)
        fixed = {v: float((rec.probs[v].argmax(1) == rec.labels).mean()) for v in served}
        ok = rec.correct()
        best = max(fixed, key=fixed.get)
        out.append(
            {
                "corruption": name,
                **{f"{k}_acc": a for k, a in fixed.items()},
                "best_fixed": best,
                "best_fixed_acc": fixed[best],
                "adaptive_acc": point.accuracy,
                "escalated": point.escalated,
                "compute": point.compute,
                # calibration of p(entry right), the predictor's "none" column, under this shift
                "ece_none": expected_calibration_error(pred[:, 0], ok[:, 0]),
            }
        )
        log.info(
            "two-stage under %s: adaptive %.2f%% vs best fixed %.2f%%", name, 100 * point.accuracy, 100 * fixed[best]
        )
    return out


def _cheap_entry(
    repo: Path,
    test: Split,
    manifest,
    main: Recorded,
    pass_ms: dict[str, float],
    threads: int,
    planner: PlannerConfig,
    seed: int,
) -> list[dict[str, Any]]:
    """The speed router's routes on `test`: its entry alone, then its entry with the follow-ups its
    router plans (balanced, at each price: the gateway plans the cheap entry's follow-ups balanced,
    planner.cheap_entry_priority, at planner.cheap_entry_price by default, without plan_tie), and the confidence rule and random escalation to its most used
    plan at the same rate. Compute in the MAIN entry's passes (1.0 = INT8 alone), so a row below
    1.0 is cheaper than the plain INT8 server's work; `main_entry_acc` is that INT8 alone."""
    sr = manifest.speed_router
    if not sr:
        return []
    router = DeferralPredictor.load((repo / sr["path"]).parent, sha256=sr.get("sha256"))
    rec = record_split(repo, test, manifest, router, pass_ms, threads, entry=sr["entry"])
    pred = router.predict(rec.entry_logits)
    prior = manifest.plan_accuracies(router.plan_names, entry=sr["entry"])
    scale = pass_ms[sr["entry"]] / pass_ms[main.entry]  # cheap entry passes → main entry passes
    ok, cost = rec.correct(), rec.extra_cost()
    o = rec.outcomes()
    main_acc = float((main.probs[main.entry].argmax(1) == main.labels).mean())
    rows = [{"label": f"{rec.entry} alone", "accuracy": float(ok[:, 0].mean()), "compute": scale, "escalated": 0.0}]
    conf = rec.confidence()
    for price in PRICES:
        cfg = planner.for_cheap_entry().model_copy(update={"followup_price": price})  # as the gateway plans it
        index = router_choice(rec, pred, Priority.BALANCED, cfg, None, prior)
        rate = float((index > 0).mean())
        row = {
            "label": f"{rec.entry} + router, balanced price={price:g}",
            "accuracy": float(ok[np.arange(len(index)), index].mean()),
            "compute": float(scale * (1.0 + cost[index]).mean()),
            "escalated": rate,
        }
        if 0 < rate < 1:
            plan = rec.plans[1 + int(np.bincount(index, minlength=len(rec.plans))[1:].argmax())].name
            up = rec.route(rec.plan_index(plan))
            row["rule_plan"] = plan
            row["confidence_acc"] = confidence_at_rate(o, conf, rec.entry, up, rate, label=plan).accuracy
            row["random_acc"] = random_escalation(o, rec.entry, up, rate, label=plan, seed=seed).accuracy
        rows.append(row)
    for r in rows:
        r["main_entry"] = main.entry
        r["main_entry_acc"] = main_acc
        r["points_vs_main_entry"] = 100 * (r["accuracy"] - main_acc)
    log.info(
        "cheap entry %s: alone %.2f%% at %.2f× %s's compute; with its router (default price) %s",
        rec.entry,
        100 * rows[0]["accuracy"],
        scale,
        main.entry,
        next(
            (
                f"{100 * r['accuracy']:.2f}% at {r['compute']:.2f}×"
                for r in rows
                if r["label"].endswith(f"price={planner.cheap_entry_price:g}")
            ),
            "–",
        ),
    )
    return rows
