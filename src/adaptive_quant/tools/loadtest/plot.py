"""One PNG of a load test: latency over time and its CDF, the variant mix over time (one panel
per phase), and the budget/accuracy shares per phase. Headless: matplotlib's Agg canvas,
no pyplot state, so it is safe to call from any thread."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adaptive_quant.tools.loadtest.stats import RequestRecord

VARIANT_COLOURS = {"fp32": "#1f77b4", "fp16": "#ff7f0e", "int8": "#2ca02c"}
_OTHER = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
BARS = [
    ("within_budget_share", "within budget (client)"),
    ("server_budget_met_share", "budget met (server)"),
    ("effective_accuracy", "effective accuracy"),
    ("accuracy", "accuracy"),
]


def _variant_colour(name: str, order: Sequence[str]) -> str:
    return VARIANT_COLOURS.get(name, _OTHER[list(order).index(name) % len(_OTHER)])


def plot_run(
    phases: Mapping[str, tuple[Sequence[RequestRecord], Mapping[str, Any]]],
    path: str | Path,
    title: str = "",
    bin_s: float = 1.0,
) -> Path:
    """`phases`: name → (records, summary) in run order → a PNG at `path`; `bin_s` is the
    summaries' bin width of the variant mix over time, s."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    names = list(phases)
    p = max(1, len(names))
    fig = Figure(figsize=(max(11.0, 4.0 * p), 11.0), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, 2 * p)
    ax_t = fig.add_subplot(grid[0, :p])
    ax_cdf = fig.add_subplot(grid[0, p:])
    ax_mix = [fig.add_subplot(grid[1, 2 * k : 2 * k + 2]) for k in range(p)]
    ax_bar = fig.add_subplot(grid[2, :])

    for name in names:
        records, _ = phases[name]
        ok = [r for r in records if r.answered and r.latency_ms is not None]
        t = np.array([r.t_s for r in ok])
        lat = np.array([r.latency_ms for r in ok])
        ax_t.scatter(t, lat, s=3, alpha=0.35, label=name)
        if lat.size:
            ax_cdf.plot(np.sort(lat), np.arange(1, lat.size + 1) / lat.size, label=name)
    budgets = {r.budget_ms for n in names for r in phases[n][0] if r.budget_ms is not None}
    if len(budgets) == 1:  # one fixed budget: show it where the latencies are
        b = budgets.pop()
        for draw in (ax_t.axhline, ax_cdf.axvline):
            draw(b, color="red", linestyle="--", linewidth=1, label=f"budget {b:g} ms")
    ax_t.set(
        xlabel="time in phase, s",
        ylabel="latency, ms (client, end to end)",
        title="latency over time",
    )
    ax_cdf.set(xlabel="latency, ms", ylabel="share of answered requests", title="latency CDF")
    if any(len(phases[n][0]) for n in names):
        # log scale, labelled in plain ms (10, 20, 50) rather than 2×10¹
        ax_t.set_yscale("log")
        ax_cdf.set_xscale("log")
        for axis in (ax_t.yaxis, ax_cdf.xaxis):
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
    for ax in (ax_t, ax_cdf):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, markerscale=3)

    mixes = [phases[n][1]["variant_mix_over_time"] for n in names]
    all_variants = sorted({v for mix in mixes for b in mix for v in b["counts"]})
    for ax, name in zip(ax_mix, names):
        bins = phases[name][1]["variant_mix_over_time"]
        # one more edge at the end: step="post" then draws the last bin over its width
        edges = [b["t_s"] for b in bins] + [bins[-1]["t_s"] + bin_s] if bins else []
        t = np.array(edges)
        rows = [[b["counts"].get(v, 0) for b in bins + bins[-1:]] for v in all_variants]
        counts = np.array(rows, dtype=float).reshape(len(all_variants), len(edges))
        total = counts.sum(axis=0)
        shares = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
        if all_variants and t.size:
            colours = [_variant_colour(v, all_variants) for v in all_variants]
            ax.stackplot(t, shares, labels=all_variants, colors=colours, step="post")
        ax.set(
            xlabel="time in phase, s",
            ylabel="share of images",
            ylim=(0, 1),
            title=f"variant mix: {name}",
        )
        ax.legend(fontsize=8, loc="lower right")

    width = 0.8 / len(BARS)
    x = np.arange(len(names))
    for j, (key, label) in enumerate(BARS):
        vals = [phases[n][1].get(key) for n in names]
        heights = [v if v is not None else 0.0 for v in vals]
        bars = ax_bar.bar(x + (j - (len(BARS) - 1) / 2) * width, heights, width, label=label)
        for rect, v in zip(bars, vals):
            text = "n/a" if v is None else f"{v:.2f}"
            ax_bar.annotate(
                text, (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center", va="bottom", fontsize=7
            )
    ax_bar.set_xticks(x, names)
    ax_bar.set(ylim=(0, 1.25), ylabel="share", title="per phase")
    ax_bar.legend(fontsize=8, ncol=len(BARS), loc="upper center", frameon=False)
    if title:
        fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
