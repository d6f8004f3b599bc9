"""The evaluation's plots (matplotlib, headless): one look per strategy in every plot.

plot_pareto   accuracy against mean latency, throughput or compute; the frontier ringed where marked
plot_sweep    per priority, accuracy and share within budget against the budget
plot_confusion  a row-normalised confusion matrix
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from adaptive_quant.evaluation.report import ClassificationMetrics
from adaptive_quant.evaluation.strategies import (
    ADAPTIVE,
    CONFIDENCE,
    FIXED,
    HTTP,
    ORACLE,
    RANDOM,
    StrategyPoint,
)

# one look per strategy, the same in every plot
STYLE = {
    FIXED: dict(marker="s", color="tab:blue", s=70),
    ADAPTIVE: dict(marker="o", color="tab:green", s=40),
    CONFIDENCE: dict(marker="^", color="tab:orange", s=45),
    RANDOM: dict(marker="x", color="tab:gray", s=45),
    ORACLE: dict(marker="*", color="tab:red", s=140),
    HTTP: dict(marker="o", color="tab:purple", s=45),
}
# x axis of the Pareto plots: (value of a point, axis label)
AXES: dict[str, tuple[Callable[[StrategyPoint], float], str]] = {
    "latency": (lambda p: p.mean_ms, "mean latency per sample, ms (batch 1)"),
    "throughput": (lambda p: p.throughput, "throughput, samples/s (batch 64)"),
    "compute": (lambda p: p.compute, "mean compute per sample, entry passes (1 = INT8 alone)"),
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
    """Accuracy against `axis` (see AXES); the fixed routes and the oracle named; the Pareto
    frontier (where marked: mark_frontiers, latency and throughput) joined and ringed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs, xlabel = AXES[axis]
    on = {"latency": lambda p: p.on_latency_frontier, "throughput": lambda p: p.on_throughput_frontier}.get(
        axis, lambda p: False
    )
    for strategy, style in STYLE.items():
        group = [p for p in points if p.strategy == strategy]
        if group:
            ax.scatter([xs(p) for p in group], [100 * p.accuracy for p in group], label=strategy, zorder=3, **style)
    for p in points:
        if p.strategy in (FIXED, ORACLE):
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
    ax.set_xlabel(xlabel)
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
    routed = [p for p in points if p.strategy in (ADAPTIVE, HTTP) and p.budget_ms is not None and p.priority]
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
