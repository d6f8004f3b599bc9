"""A run's results as the JSON document scripts/loadtest.py writes, and as a short table. Pure."""

from __future__ import annotations

import os
import platform
from typing import Any

from adaptive_quant.core.host import cpu_model
from adaptive_quant.tools.loadtest.config import LoadTestConfig


def machine_info() -> dict[str, Any]:
    """Where the figures were measured: they mean little without it (AMD EPYC one day, Intel
    Xeon the next)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_1m": load,
    }


def build_results(
    cfg: LoadTestConfig,
    summaries: dict[str, dict[str, Any]],
    calibration: dict[str, Any] | None,
    extra_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """{"config": {...}, "phases": {name: summary}, "calibration": {...} | None}."""
    config = {**cfg.to_json(), **(extra_config or {}), "machine": machine_info()}
    return {"config": config, "phases": summaries, "calibration": calibration}


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    """One line per phase: latency percentiles, budget shares, accuracy, throughput, errors, mix."""
    w = max([10, *(len(n) for n in summaries)])  # "baseline/adaptive" with --compare
    head = (
        f"{'phase':<{w}} {'answered':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'in budget':>9} "
        f"{'srv met':>8} {'acc':>6} {'eff acc':>7} {'req/s':>8} {'rss +% all/load':>15} {'cpu ms/req srv/cli':>18}  errors / variant mix"
    )
    lines = [head, "-" * len(head)]
    for name, s in summaries.items():
        lat = s["latency_ms"]
        errors = ", ".join(f"{k}:{v}" for k, v in s["errors_by_kind"].items()) or "none"
        mix = " ".join(f"{k} {v:.0%}" for k, v in s["variant_mix"].items()) or "-"
        mem = s.get("memory", {})
        growth = f"{_f(mem.get('growth_pct'), '.2f')}/{_f(mem.get('growth_recorded_pct'), '.2f')}"
        cpu = s.get("cpu_ms_per_request") or {}
        cpu_text = f"{_f(cpu.get('server'), '.3f')}/{_f(cpu.get('client'), '.3f')}"
        lines.append(
            f"{name:<{w}} {s['answered']:>4}/{s['requests']:<4} {_f(lat['p50'], '8.2f')} {_f(lat['p95'], '8.2f')} "
            f"{_f(lat['p99'], '8.2f')} {_f(s['within_budget_share'], '9.3f')} {_f(s['server_budget_met_share'], '8.3f')} "
            f"{_f(s['accuracy'], '6.3f')} {_f(s['effective_accuracy'], '7.3f')} {_f(s['throughput_rps'], '8.1f')} "
            f"{growth:>15} {cpu_text:>18}  {errors} / {mix}"
        )
    return "\n".join(lines)
