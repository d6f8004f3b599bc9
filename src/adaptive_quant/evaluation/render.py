"""The one renderer of both reports: markdown, JSON and PNG plots (matplotlib, headless).

Every strategy point, single-stage or two-stage, goes through the same table (`points_table`,
columns picked from `COLUMNS`) and the same Pareto plot (`plot_pareto`, x = mean latency,
throughput or compute, plots.py), one look per strategy:
  report.md, report.json, confusion_*.png, pareto_*.png, sweep.png    an EvaluationReport
  two_stage.md, two_stage.json, two_stage_pareto.png                  a TwoStageReport
  a plain-text table (aq-fit-router --cross-validate)                 a CrossValidation
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from adaptive_quant.core.stats import format_interval
from adaptive_quant.evaluation.plots import plot_confusion, plot_pareto, plot_sweep
from adaptive_quant.evaluation.report import ClassificationMetrics
from adaptive_quant.evaluation.strategies import ADAPTIVE, HTTP, StrategyPoint

if TYPE_CHECKING:
    from adaptive_quant.evaluation.offline import EvaluationReport
    from adaptive_quant.evaluation.router_cv import CrossValidation
    from adaptive_quant.evaluation.two_stage_report import TwoStageReport

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- markdown


def _mix(p: StrategyPoint) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in p.mix.items() if v > 0.0005) or "-"


def _opt(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _frontier(p: StrategyPoint) -> str:
    return f"{'●' if p.on_latency_frontier else '·'} / {'●' if p.on_throughput_frontier else '·'}"


# column name → (header, right-aligned, the cell of a point)
COLUMNS: dict[str, tuple[str, bool, Callable[[StrategyPoint], str]]] = {
    "strategy": ("strategy", False, lambda p: p.strategy),
    "configuration": ("configuration", False, lambda p: p.label),
    "name": ("name", False, lambda p: p.label),
    "accuracy": ("accuracy", True, lambda p: f"{p.accuracy:.2%}"),
    "compute": ("compute (entry passes)", True, lambda p: _opt(p.compute, ".2f")),
    "escalated": ("escalated", True, lambda p: f"{p.escalated:.1%}"),
    "mean_ms": ("mean ms", True, lambda p: f"{p.mean_ms:.3f}"),
    "p99_ms": ("p99 ms", True, lambda p: f"{p.p99_ms:.3f}"),
    "within": ("within budget", True, lambda p: _opt(p.within_budget, ".1%")),
    "router_met": ("router budget met", True, lambda p: _opt(p.extra.get("router_budget_met"), ".1%")),
    "throughput": ("samples/s (b64)", True, lambda p: f"{p.throughput:,.0f}"),
    "mix": ("mix", False, _mix),
    "frontier": ("frontier (lat / thr)", False, _frontier),
}
LATENCY_COLUMNS = (
    "configuration",
    "accuracy",
    "mean_ms",
    "p99_ms",
    "within",
    "router_met",
    "throughput",
    "mix",
    "frontier",
)
COMPUTE_COLUMNS = ("strategy", "name", "accuracy", "compute", "escalated")


def points_table(points: list[StrategyPoint], columns: tuple[str, ...] = LATENCY_COLUMNS) -> list[str]:
    """A markdown table, one row per point, the `columns` of COLUMNS."""
    cols = [COLUMNS[c] for c in columns]
    lines = [
        "| " + " | ".join(h for h, _, _ in cols) + " |",
        "|" + "".join("---:|" if right else "---|" for _, right, _ in cols),
    ]
    lines += ["| " + " | ".join(cell(p) for _, _, cell in cols) + " |" for p in points]
    return lines


def _class_table(m: ClassificationMetrics) -> list[str]:
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {c.name} | {c.precision:.3f} | {c.recall:.3f} | {c.f1:.3f} | {c.support} |" for c in m.per_class]
    return lines


def render_markdown(report: EvaluationReport, plots: dict[str, str]) -> str:
    m = report.meta
    out = [
        f"# Evaluation report: {m.get('model', m.get('url', ''))}",
        "",
        f"Generated {m['created_at']} ({report.mode}).",
        "",
    ]
    out += ["## Verdict", "", report.verdict, ""]
    out += ["## Setup", ""]
    for key in (
        "repository",
        "url",
        "split",
        "samples",
        "single_stage",
        "routing",
        "router_estimates_ms",
        "budgets_ms",
    ):
        if key in m:
            out.append(f"- **{key}**: {m[key]}")
    if "host" in m:
        h = m["host"]
        out.append(
            f"- **host**: {h.get('cpu')}, {h.get('cores')} cores, {h.get('threads')} ORT threads, onnxruntime {h.get('onnxruntime')}"
        )
    out += ["", f"**How latency is modelled.** {m['latency_model']}", ""]
    if report.variants:
        out += [
            "## Per variant (test split)",
            "",
            "| variant | served | accuracy | drop vs fp32, points | macro P | macro R | macro F1 | p50 ms | p95 ms | p99 ms | samples/s (b64) | size KB | val acc |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for v in report.variants:
            mm, lat = v.metrics, v.latency_ms
            out.append(
                f"| {v.key} | {'yes' if v.served else 'no (baseline)'} | {mm.accuracy:.2%} | "
                f"{_opt(v.accuracy_drop_points, '+.2f')} | {mm.macro_precision:.4f} | {mm.macro_recall:.4f} | "
                f"{mm.macro_f1:.4f} | {lat['p50']:.3f} | {lat['p95']:.3f} | {lat['p99']:.3f} | "
                f"{v.throughput_b64:,.0f} | {v.size_bytes / 1e3:,.1f} | {_opt(v.val_accuracy, '.2%')} |"
            )
        out.append("")
        out.append(
            "INT8 (QAT) is the served INT8 variant; int8_ptq is the post-training-quantized baseline of the same FP32 network."
        )
        out.append("")
        for v in report.variants:
            out += [
                f"### {v.key}: per class",
                "",
                *_class_table(v.metrics),
                "",
                f"![confusion matrix {v.key}]({plots[f'confusion_{v.key}']})",
                "",
            ]
    if report.service_metrics is not None:
        out += [
            "## The service as callers see it (balanced, no budget)",
            "",
            f"accuracy {report.service_metrics.accuracy:.2%}, macro P/R/F1 {report.service_metrics.macro_precision:.4f} / "
            f"{report.service_metrics.macro_recall:.4f} / {report.service_metrics.macro_f1:.4f}",
            "",
            *_class_table(report.service_metrics),
            "",
            f"![confusion matrix]({plots['confusion_service']})",
            "",
        ]
    adaptive = [p for p in report.points if p.strategy in (ADAPTIVE, HTTP)]
    out += [
        "## Adaptive routing: budgets × priorities",
        "",
        *(
            [
                "Single-stage routing, as the gateway routes without a router: each variant's validation accuracy "
                "for every sample, so each point sends every sample to one variant. The two-stage router, which "
                "routes per sample, has its own report (two_stage.md).",
                "",
            ]
            if report.mode == "in-process"
            else []
        ),
        "Within budget = share of samples whose modelled latency is at most the budget. "
        "Router budget met = share for which the router's estimate fitted (else it took the fastest variant).",
        "",
        *points_table(adaptive),
        "",
    ]
    if "sweep" in plots:
        out += [f"![sweep]({plots['sweep']})", ""]
    base = [p for p in report.points if p.strategy not in (ADAPTIVE, HTTP)]
    if base:
        out += [
            "## Baselines",
            "",
            "Oracle: the cheapest variant that is right (needs the labels; a ceiling). "
            "Cascade: INT8 first, FP32 when INT8's top softmax probability is below the threshold (pays both).",
            "",
            *points_table(base),
            "",
        ]
    out += [
        "## Pareto frontier",
        "",
        "Over deployable configurations (every point except the oracle and the non-served PTQ baseline). "
        "Ringed points in the plots; ● in the tables.",
        "",
    ]
    for axis, attr in (("mean latency", "on_latency_frontier"), ("throughput", "on_throughput_frontier")):
        front = [p for p in report.points if getattr(p, attr)]
        front.sort(key=lambda p: p.mean_ms if axis == "mean latency" else -p.throughput)
        out.append(
            f"- **accuracy vs {axis}**: "
            + "; ".join(f"{p.label} ({p.accuracy:.2%}, {p.mean_ms:.3g} ms, {p.throughput:,.0f}/s)" for p in front)
        )
    out += ["", f"![accuracy vs latency]({plots['pareto_latency']})", ""]
    if "pareto_throughput" in plots:
        out += [f"![accuracy vs throughput]({plots['pareto_throughput']})", ""]
    return "\n".join(out) + "\n"


def write_report(report: EvaluationReport, out_dir: str | Path) -> list[Path]:
    """report.json, report.md and the PNGs into out_dir (created); returns every file written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    plots: dict[str, str] = {}
    for v in report.variants:
        files.append(plot_confusion(v.metrics, v.key, out / f"confusion_{v.key}.png"))
        plots[f"confusion_{v.key}"] = files[-1].name
    if report.service_metrics is not None:
        files.append(plot_confusion(report.service_metrics, "service", out / "confusion_service.png"))
        plots["confusion_service"] = files[-1].name
    files.append(plot_pareto(report.points, "latency", out / "pareto_latency.png", "accuracy vs mean latency"))
    plots["pareto_latency"] = files[-1].name
    if report.mode == "in-process":  # over HTTP there is no batch-64 measurement
        files.append(plot_pareto(report.points, "throughput", out / "pareto_throughput.png", "accuracy vs throughput"))
        plots["pareto_throughput"] = files[-1].name
    if any(p.budget_ms is not None for p in report.points):
        files.append(plot_sweep(report.points, out / "sweep.png"))
        plots["sweep"] = files[-1].name
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=float) + "\n")
    (out / "report.md").write_text(render_markdown(report, plots))
    files += [out / "report.json", out / "report.md"]
    log.info("wrote %d files to %s", len(files), out)
    return files


def render_two_stage(report: TwoStageReport) -> str:
    """two_stage.md: the verdict, the setup, every strategy (the same table as report.md's, by
    compute), equal-rate comparisons, AUROC, budgets, shift, targets."""
    lines = ["# Two-stage routing", "", "## Verdict", "", report.verdict, "", "## Setup", ""]
    lines += [f"- **{k}**: {v}" for k, v in report.meta.items()]
    lines += ["", "## Strategies (test split, no budget)", ""]
    lines += points_table(report.points, COMPUTE_COLUMNS)
    lines += ["", "## Learned router against the confidence rule and random escalation, at equal rate", ""]
    lines += [
        "| router | rate | rule and random escalate to | router | confidence rule | random |",
        "|---|---:|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['router']} | {100 * r['rate']:.1f}% | {r.get('plan', '–')} | {100 * r['router_acc']:.2f}% "
        f"| {100 * r['confidence_acc']:.2f}% | {100 * r['random_acc']:.2f}% |"
        for r in report.equal_rate
    ]
    if report.cheap_entry:
        main = report.cheap_entry[0]["main_entry"]
        lines += ["", "## Cheap entry (`X-Priority: speed`), test split, no budget", ""]
        lines += [
            f"Compute in {main} passes; {main} alone answers {100 * report.cheap_entry[0]['main_entry_acc']:.2f}%.",
            "",
            f"| route | accuracy | vs {main} alone | compute | escalated | confidence rule / random, same rate and plan |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in report.cheap_entry:
            rule = (
                f"{100 * r['confidence_acc']:.2f}% / {100 * r['random_acc']:.2f}% → {r['rule_plan']}"
                if "confidence_acc" in r
                else "–"
            )
            lines.append(
                f"| {r['label']} | {100 * r['accuracy']:.2f}% | {r['points_vs_main_entry']:+.2f} | "
                f"{r['compute']:.2f}× | {100 * r['escalated']:.1f}% | {rule} |"
            )
    lines += ["", "## AUROC for “the follow-up turns a wrong answer right” (test split)", ""]
    lines += ["| plan | fixes | breaks | learned gain | confidence rule |", "|---|---:|---:|---:|---:|"]
    lines += [
        f"| {k} | {a['fixes']} | {a['breaks']} | {a['learned']:.3f} | {a['confidence']:.3f} |"
        for k, a in report.auroc.items()
    ]
    lines += ["", "## Budgets (one image per request, idle server)", ""]
    lines += [
        "| budget ms | balanced | escalated | random, same plans | quality | escalated | random, same plans "
        "| best fixed choice that fits | its accuracy | quality − it, 95 % interval "
        "| best the planner could plan | its accuracy | fixed choice best on validation | its accuracy |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---|---:|",
    ]
    lines += [
        f"| {b['budget_ms']:.3f} | {100 * b['router_acc']:.2f}% | {100 * b['router_escalated']:.1f}% | "
        f"{100 * b['router_random_acc']:.2f}% | {100 * b['quality_acc']:.2f}% | {100 * b['quality_escalated']:.1f}% | "
        f"{100 * b['quality_random_acc']:.2f}% | {b['best_fixed']} | {100 * b['best_fixed_acc']:.2f}% | "
        f"{100 * (b['quality_acc'] - b['best_fixed_acc']):+.2f} ({format_interval(b.get('quality_ci95'))}) | "
        f"{b['best_plannable']} | {100 * b['best_plannable_acc']:.2f}% | "
        f"{b.get('best_validated') or '–'} | "
        f"{_opt(b.get('best_validated_acc'), '.2%')} |"
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


def write_two_stage(report: TwoStageReport, out_dir: str | Path) -> list[Path]:
    """two_stage.md, two_stage.json and two_stage_pareto.png into out_dir (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "two_stage.md"
    md.write_text(render_two_stage(report))
    js = out / "two_stage.json"
    js.write_text(json.dumps(asdict(report), indent=2, default=float) + "\n")
    title = "two-stage routing: accuracy against compute (test split)"
    return [md, js, plot_pareto(report.points, "compute", out / "two_stage_pareto.png", title)]


def render_cross_validation(cv: CrossValidation, entry_ms: float) -> str:
    """The cross-validation as a plain-text table: one row per tie, one column per budget."""
    first = cv.ties[0]["budgets"]
    heads = ["none" if b["budget_ms"] is None else f"{b['budget_ms'] / entry_ms:g}×" for b in first]
    lines = [
        f"{cv.folds}-fold cross-validation on {cv.samples} validation images (router refitted per fold), "
        f"mean of {cv.repeats} fold assignment(s)",
        "quality minus the best fixed variant or plan that fits, picked in hindsight on the pooled folds, points, "
        "per budget (× the entry pass; idle):",
        f"{'quality_tie':>12}" + "".join(f"{h:>8}" for h in heads) + f"{'worst':>8}  worst per repeat",
    ]
    nested = "gap_vs_selected_points" in first[0]  # the tie is chosen on the nested table below
    for t in cv.ties:
        mark = "  ← chosen" if t["quality_tie"] == cv.chosen_tie and not nested else ""
        lines.append(
            f"{t['quality_tie']:>12g}"
            + "".join(f"{b['gap_points']:>+8.2f}" for b in t["budgets"])
            + f"{t['worst_gap_points']:>+8.2f}  {t['worst_gap_range'][0]:+.2f} … {t['worst_gap_range'][1]:+.2f}{mark}"
        )
    lines.append("best fixed choice per budget: " + ", ".join(f"{h} {b['best_fixed']}" for h, b in zip(heads, first)))
    if nested:
        lines.append(
            "quality minus the fixed choice that fits picked on the other folds (nested: what a deployment "
            "without routing would ship), points:"
        )
        lines += [
            f"{t['quality_tie']:>12g}"
            + "".join(f"{b['gap_vs_selected_points']:>+8.2f}" for b in t["budgets"])
            + f"{t['worst_gap_vs_selected_points']:>+8.2f}"
            + ("  ← chosen (the best worst case here)" if t["quality_tie"] == cv.chosen_tie else "")
            for t in cv.ties
        ]
    b = cv.balanced
    conf = (
        ""
        if b["confidence_acc"] is None
        else f"; the confidence rule → {b['confidence_plan']} at that rate {b['confidence_acc']:.2%}"
    )
    lines.append(f"balanced: {b['accuracy']:.2%} at {b['compute']:.2f}× compute, {b['escalated']:.1%} escalated{conf}")
    if b["per_repeat_gain_points"] and b["confidence_acc"] is not None:
        g = b["per_repeat_gain_points"]
        lines.append(f"balanced minus the confidence rule per repeat: {min(g):+.2f} … {max(g):+.2f} points")
    if cv.prices:
        lines.append(
            f"balanced per planner.followup_price (points over the best served variant, {cv.prices[0]['best_variant']}):"
        )
        lines.append(f"{'price':>8}{'accuracy':>10}{'points':>8}{'escalated':>11}{'compute':>9}")
        for p in cv.prices:
            lines.append(
                f"{p['followup_price']:>8g}{p['accuracy']:>10.2%}{p['gain_points']:>+8.2f}"
                f"{p['escalated']:>11.1%}{p['compute']:>8.2f}×"
            )
    return "\n".join(lines)


def log_report_to_mlflow(tracking_cfg, report: EvaluationReport, files: list[Path]) -> str | None:
    """An MLflow evaluation run with the headline numbers and every report file; returns its run id."""
    from adaptive_quant.tracking import git_commit, start_run

    with start_run(tracking_cfg, kind=f"evaluate-{report.mode}") as tracker:
        tracker.set_tags(
            {
                "phase": "evaluation",
                "mode": report.mode,
                "git_commit": git_commit(),
                "training_run": str(report.meta.get("training", {}).get("mlflow_run_id")),
            }
        )
        tracker.log_params(
            {
                k: report.meta.get(k)
                for k in ("repository", "url", "samples", "limit", "latency_iters", "throughput_seconds", "budgets_ms")
                if k in report.meta
            }
        )
        metrics: dict[str, float] = {}
        for v in report.variants:
            metrics |= {
                f"{v.key}/accuracy": v.metrics.accuracy,
                f"{v.key}/macro_f1": v.metrics.macro_f1,
                f"{v.key}/p50_ms": v.latency_ms["p50"],
                f"{v.key}/p99_ms": v.latency_ms["p99"],
                f"{v.key}/throughput_b64": v.throughput_b64,
                f"{v.key}/size_bytes": float(v.size_bytes),
            }
        if report.service_metrics is not None:
            metrics["service/accuracy"] = report.service_metrics.accuracy
        adaptive = [p for p in report.points if p.strategy in (ADAPTIVE, HTTP)]
        if adaptive:
            best = max(adaptive, key=lambda p: p.accuracy)
            metrics |= {"adaptive/best_accuracy": best.accuracy, "adaptive/best_mean_ms": best.mean_ms}
        metrics["frontier/latency_points"] = float(sum(p.on_latency_frontier for p in report.points))
        tracker.log_metrics(metrics)
        for f in files:
            tracker.log_artifact(f, artifact_path="report")
        return tracker.run_id
