"""Write an EvaluationReport as report.md, report.json and PNG plots (matplotlib, headless)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from adaptive_quant.evaluation.report import ClassificationMetrics
from adaptive_quant.evaluation.strategies import StrategyPoint

if TYPE_CHECKING:
    from adaptive_quant.evaluation.offline import EvaluationReport

log = logging.getLogger(__name__)

# one look per strategy, the same in every plot
STYLE = {
    "fixed": dict(marker="s", color="tab:blue", s=70),
    "adaptive": dict(marker="o", color="tab:green", s=40),
    "cascade": dict(marker="^", color="tab:orange", s=45),
    "oracle": dict(marker="*", color="tab:red", s=140),
    "http": dict(marker="o", color="tab:purple", s=45),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(metrics: ClassificationMetrics, title: str, path: Path) -> Path:
    """Row-normalised confusion matrix (share of each true class), counts written in the cells."""
    plt = _plt()
    cm = np.asarray(metrics.confusion, dtype=np.float64)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    names = [c.name for c in metrics.per_class]
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(names)):
        for j in range(len(names)):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    f"{int(cm[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    ax.set_title(f"{title}: accuracy {metrics.accuracy:.2%}")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pareto(points: list[StrategyPoint], axis: str, path: Path, title: str) -> Path:
    """Accuracy against mean latency (axis='latency') or throughput (axis='throughput'); frontier joined and ringed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = (lambda p: p.mean_ms) if axis == "latency" else (lambda p: p.throughput)
    on = (lambda p: p.on_latency_frontier) if axis == "latency" else (lambda p: p.on_throughput_frontier)
    for strategy, style in STYLE.items():
        group = [p for p in points if p.strategy == strategy]
        if group:
            ax.scatter([xs(p) for p in group], [100 * p.accuracy for p in group], label=strategy, zorder=3, **style)
    for p in points:
        if p.strategy in ("fixed", "oracle"):
            ax.annotate(
                p.label.replace("fixed ", "").replace(" (baseline, not served)", " (PTQ)"),
                (xs(p), 100 * p.accuracy),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=8,
            )
    front = sorted((p for p in points if on(p)), key=xs)
    if front:
        ax.plot([xs(p) for p in front], [100 * p.accuracy for p in front], "k--", lw=1, zorder=2)
        ax.scatter(
            [xs(p) for p in front],
            [100 * p.accuracy for p in front],
            s=180,
            facecolors="none",
            edgecolors="black",
            linewidths=1.3,
            zorder=4,
            label="Pareto frontier",
        )
    ax.set_xlabel("mean latency per sample, ms (batch 1)" if axis == "latency" else "throughput, samples/s (batch 64)")
    ax.set_ylabel("accuracy, %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(points: list[StrategyPoint], path: Path) -> Path:
    """Per priority: accuracy and share within budget against the budget."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    routed = [p for p in points if p.strategy in ("adaptive", "http") and p.budget_ms is not None and p.priority]
    for prio in sorted({p.priority for p in routed}):
        group = sorted((p for p in routed if p.priority == prio), key=lambda p: p.budget_ms)
        b = [p.budget_ms for p in group]
        a1.plot(b, [100 * p.accuracy for p in group], "o-", label=prio)
        a2.plot(b, [100 * (p.within_budget or 0.0) for p in group], "o-", label=prio)
    for ax, ylab in ((a1, "accuracy, %"), (a2, "samples within budget, %")):
        ax.set_xscale("log")
        ax.set_xlabel("latency budget, ms")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("adaptive routing across budgets and priorities")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- markdown


def _mix(p: StrategyPoint) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in p.mix.items() if v > 0.0005) or "-"


def _opt(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _points_table(points: list[StrategyPoint]) -> list[str]:
    lines = [
        "| configuration | accuracy | mean ms | p99 ms | within budget | router budget met | samples/s (b64) | mix | frontier (lat / thr) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for p in points:
        front = f"{'●' if p.on_latency_frontier else '·'} / {'●' if p.on_throughput_frontier else '·'}"
        lines.append(
            f"| {p.label} | {p.accuracy:.2%} | {p.mean_ms:.3f} | {p.p99_ms:.3f} | "
            f"{_opt(p.within_budget, '.1%')} | {_opt(p.extra.get('router_budget_met'), '.1%')} | "
            f"{p.throughput:,.0f} | {_mix(p)} | {front} |"
        )
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
    adaptive = [p for p in report.points if p.strategy in ("adaptive", "http")]
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
        *_points_table(adaptive),
        "",
    ]
    if "sweep" in plots:
        out += [f"![sweep]({plots['sweep']})", ""]
    base = [p for p in report.points if p.strategy not in ("adaptive", "http")]
    if base:
        out += [
            "## Baselines",
            "",
            "Oracle: the cheapest variant that is right (needs the labels; a ceiling). "
            "Cascade: INT8 first, FP32 when INT8's top softmax probability is below the threshold (pays both).",
            "",
            *_points_table(base),
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
        adaptive = [p for p in report.points if p.strategy in ("adaptive", "http")]
        if adaptive:
            best = max(adaptive, key=lambda p: p.accuracy)
            metrics |= {"adaptive/best_accuracy": best.accuracy, "adaptive/best_mean_ms": best.mean_ms}
        metrics["frontier/latency_points"] = float(sum(p.on_latency_frontier for p in report.points))
        tracker.log_metrics(metrics)
        for f in files:
            tracker.log_artifact(f, artifact_path="report")
        return tracker.run_id
