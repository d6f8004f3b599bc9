"""The two-stage routing report: run the passes on the test split (and on corrupted validation
copies), price every strategy of `two_stage`, and write two_stage.md / .json / a Pareto plot.

Compute is counted in entry passes (1.0 = INT8 alone); latency per pass is the batch-1 p50
measured on this host by the main evaluation (or the manifest's profile when not given).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adaptive_quant.core.images import to_model_input
from adaptive_quant.core.manifest import load_manifest
from adaptive_quant.core.planner import PlannerConfig, effective_slack
from adaptive_quant.core.plans import Pass, Plan, View
from adaptive_quant.core.routing import Priority
from adaptive_quant.data import Split
from adaptive_quant.evaluation.corruptions import CORRUPTIONS, corrupt
from adaptive_quant.evaluation.two_stage import (
    BUDGET_FACTORS,
    Recorded,
    TwoStagePoint,
    best_within,
    confidence_at_rate,
    confidence_cascade,
    fixed_choices,
    fixed_plans,
    fixed_variants,
    flip_plan,
    followup_auroc,
    oracle,
    random_assignment,
    random_escalation,
    router_choice,
    router_points,
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
    points: list[TwoStagePoint]  # test split, no budget
    equal_rate: list[dict[str, float]]  # router vs confidence vs random at the router's escalation rates
    auroc: dict[str, dict[str, float]]  # plan → "follow-up turns a wrong answer right": learned vs confidence
    budgets: list[dict[str, Any]]  # per budget: router accuracy, best fixed choice that fits
    shift: list[dict[str, Any]] = field(default_factory=list)  # per corruption of the validation split
    targets: dict[str, Any] = field(default_factory=dict)
    verdict: str = ""


def record_split(repo: Path, split: Split, manifest, router: DeferralPredictor, pass_ms, threads: int) -> Recorded:
    """Run the entry pass, every pass of the router's plans and every served variant on `split`."""
    entry = manifest.router["entry"]
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
    points = fixed_variants(rec, served) + fixed_plans(rec) + confidence_cascade(rec, flip, THRESHOLDS)
    points += router_points(rec, pred, list(Priority), list(PRICES), planner, prior=prior) + [oracle(rec)]
    default = next(
        p for p in points if p.strategy == "router" and p.name == f"balanced price={planner.followup_price:g}"
    )
    equal_rate = []
    for p in points:
        if p.strategy == "router" and p.name.startswith("balanced") and 0 < p.escalated < 1:
            conf = confidence_at_rate(rec, flip, p.escalated)
            rnd = random_escalation(rec, flip, p.escalated, seed=seed)
            equal_rate.append(
                {
                    "router": p.name,
                    "rate": p.escalated,
                    "router_acc": p.accuracy,
                    "router_compute": p.compute,
                    "confidence_acc": conf.accuracy,
                    "confidence_compute": conf.compute,
                    "random_acc": rnd.accuracy,
                }
            )
    auroc = {p.name: followup_auroc(rec, pred, p.name) for p in rec.plans[1:]}
    budgets = _budget_sweep(rec, pred, planner, served, prior, seed)
    shift = _shift(repo, val, manifest, router, pass_ms, threads, seed, planner, served) if val is not None else []
    best_fixed = max((p for p in points if p.strategy == "fixed variant"), key=lambda p: p.accuracy)
    best_plan = max((p for p in points if p.strategy == "fixed plan"), key=lambda p: p.accuracy)
    quality = next(p for p in points if p.strategy == "router" and p.name == "quality")
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
        targets=targets,
    )
    report.verdict = _verdict(report, default, best_fixed, best_plan, quality)
    return report


def _budget_sweep(
    rec: Recorded, pred: np.ndarray, planner: PlannerConfig, served: list[str], prior: list[float] | None, seed: int
) -> list[dict[str, Any]]:
    """Per budget (ms of one batch-1 request, idle server): balanced and quality against every fixed
    choice that fits (its modelled time within the budget), against the fixed choices the planner
    could itself plan there (effective_slack × the follow-up's time within what the entry leaves),
    and against random assignment of the same plans at the same rate."""
    entry_ms = rec.pass_ms[rec.entry]
    ok = rec.correct()
    ms = rec.extra_ms()
    fixed = fixed_choices(rec, served)
    rows = np.arange(len(rec.labels))
    out = []
    for factor in BUDGET_FACTORS:
        budget = entry_ms * factor
        row: dict[str, Any] = {"budget_ms": budget}
        for key, priority in (("router", Priority.BALANCED), ("quality", Priority.QUALITY)):
            index = router_choice(rec, pred, priority, planner, budget, prior)
            row[f"{key}_acc"] = float(ok[rows, index].mean())
            row[f"{key}_escalated"] = float((index > 0).mean())
            row[f"{key}_latency_ms"] = float(entry_ms + ms[index].mean())
            row[f"{key}_random_acc"] = random_assignment(rec, index, seed=seed)
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


def _verdict(report: TwoStageReport, default, best_fixed, best_plan, quality) -> str:
    t = report.targets
    eq = [r for r in report.equal_rate if r["router"] == default.name]
    rule = ""
    if eq:
        r = eq[0]
        diff = 100 * (r["router_acc"] - r["confidence_acc"])
        word = "beats" if diff > 0.1 else "trails" if diff < -0.1 else "ties"
        rule = (
            f" At its escalation rate ({r['rate']:.1%}) the learned router {word} the plain confidence rule "
            f"({100 * r['router_acc']:.2f}% vs {100 * r['confidence_acc']:.2f}%, {diff:+.2f} points) and beats random "
            f"escalation ({100 * r['random_acc']:.2f}%)."
        )
    budgets = ""
    if report.budgets:
        worst = min(report.budgets, key=lambda b: b["quality_acc"] - b["best_fixed_acc"])
        gap = 100 * (worst["quality_acc"] - worst["best_fixed_acc"])
        plannable = min(b["quality_acc"] - b["best_plannable_acc"] for b in report.budgets)
        budgets = (
            f" Under budgets ({len(report.budgets)} from {report.budgets[0]['budget_ms']:.2f} to "
            f"{report.budgets[-1]['budget_ms']:.2f} ms), `quality` is at worst {gap:+.2f} points against the best "
            f"fixed choice whose time fits ({worst['best_fixed']} at {worst['budget_ms']:.2f} ms) and at worst "
            f"{100 * plannable:+.2f} against the best one the planner could plan there (its margin × a "
            f"follow-up's time within what the entry leaves); "
            f"{'never below' if t.get('budgets_met_random') else 'not always above'} random assignment of the "
            f"same plans at the same rate."
        )
    return (
        f"Two-stage routing (balanced, default price {report.meta['followup_price']:g}) answers "
        f"{100 * default.accuracy:.2f}% at {default.compute:.2f}× the entry pass's compute, escalating "
        f"{default.escalated:.1%} of samples: {t['default_gain_points']:+.2f} points over the best fixed variant "
        f"({best_fixed.name}, {100 * best_fixed.accuracy:.2f}%). `quality` answers {100 * quality.accuracy:.2f}% "
        f"at {quality.compute:.2f}×, {t['quality_vs_best_plan_points']:+.2f} points against the most accurate fixed "
        f"plan ({best_plan.name}, {100 * best_plan.accuracy:.2f}% at {best_plan.compute:.2f}×).{rule}{budgets}"
    )


def render_two_stage(report: TwoStageReport) -> str:
    lines = ["# Two-stage routing", "", "## Verdict", "", report.verdict, "", "## Setup", ""]
    lines += [f"- **{k}**: {v}" for k, v in report.meta.items()]
    lines += ["", "## Strategies (test split, no budget)", ""]
    lines += ["| strategy | name | accuracy | compute (entry passes) | escalated |", "|---|---|---:|---:|---:|"]
    lines += [
        f"| {p.strategy} | {p.name} | {100 * p.accuracy:.2f}% | {p.compute:.2f} | {100 * p.escalated:.1f}% |"
        for p in report.points
    ]
    lines += ["", "## Learned router against the confidence rule and random escalation, at equal rate", ""]
    lines += ["| router | rate | router | confidence rule | random |", "|---|---:|---:|---:|---:|"]
    lines += [
        f"| {r['router']} | {100 * r['rate']:.1f}% | {100 * r['router_acc']:.2f}% | {100 * r['confidence_acc']:.2f}% "
        f"| {100 * r['random_acc']:.2f}% |"
        for r in report.equal_rate
    ]
    lines += ["", "## AUROC for “the follow-up turns a wrong answer right” (test split)", ""]
    lines += ["| plan | fixes | breaks | learned gain | confidence rule |", "|---|---:|---:|---:|---:|"]
    lines += [
        f"| {k} | {a['fixes']} | {a['breaks']} | {a['learned']:.3f} | {a['confidence']:.3f} |"
        for k, a in report.auroc.items()
    ]
    lines += ["", "## Budgets (one image per request, idle server)", ""]
    lines += [
        "| budget ms | balanced | escalated | random, same plans | quality | escalated | random, same plans "
        "| best fixed choice that fits | its accuracy | best the planner could plan | its accuracy |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    lines += [
        f"| {b['budget_ms']:.3f} | {100 * b['router_acc']:.2f}% | {100 * b['router_escalated']:.1f}% | "
        f"{100 * b['router_random_acc']:.2f}% | {100 * b['quality_acc']:.2f}% | {100 * b['quality_escalated']:.1f}% | "
        f"{100 * b['quality_random_acc']:.2f}% | {b['best_fixed']} | {100 * b['best_fixed_acc']:.2f}% | "
        f"{b['best_plannable']} | {100 * b['best_plannable_acc']:.2f}% |"
        for b in report.budgets
    ]
    if report.shift:
        keys = [k for k in report.shift[0] if k.endswith("_acc") and k not in ("best_fixed_acc", "adaptive_acc")]
        lines += ["", "## Under shift (corrupted copies of the validation split)", ""]
        lines += [
            "| corruption | " + " | ".join(k[:-4] for k in keys) + " | adaptive | escalated | ECE of p(entry right) |",
            "|---|" + "---:|" * (len(keys) + 3),
        ]
        for s in report.shift:
            accs = " | ".join(f"{100 * s[k]:.2f}%" for k in keys)
            lines.append(
                f"| {s['corruption']} | {accs} | {100 * s['adaptive_acc']:.2f}% | {100 * s['escalated']:.1f}% | "
                f"{s['ece_none']:.3f} |"
            )
    lines += ["", "## Targets", ""] + [f"- {k}: {v}" for k, v in report.targets.items()]
    return "\n".join(lines) + "\n"


def plot_two_stage(report: TwoStageReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for strategy, marker in (
        ("fixed variant", "s"),
        ("fixed plan", "D"),
        ("confidence", "^"),
        ("router", "o"),
        ("oracle", "*"),
    ):
        group = [p for p in report.points if p.strategy == strategy]
        ax.scatter([p.compute for p in group], [100 * p.accuracy for p in group], marker=marker, label=strategy)
    rates = report.equal_rate
    if rates:
        ax.scatter(
            [r["confidence_compute"] for r in rates], [100 * r["random_acc"] for r in rates], marker="x", label="random"
        )
    ax.set_xlabel("mean compute per sample, entry passes (1 = INT8 alone)")
    ax.set_ylabel("accuracy, %")
    ax.set_title("two-stage routing: accuracy against compute (test split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_two_stage(report: TwoStageReport, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "two_stage.md"
    md.write_text(render_two_stage(report))
    js = out / "two_stage.json"
    js.write_text(json.dumps(asdict(report), indent=2, default=float) + "\n")
    return [md, js, plot_two_stage(report, out / "two_stage_pareto.png")]
