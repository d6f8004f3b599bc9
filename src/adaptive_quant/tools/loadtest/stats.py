"""Per-request records → one phase's summary. Pure: no clock, no network.

Definitions (what a caller of the service would notice):
  answered            HTTP 200 with one prediction per image sent
  latency             client-measured, end to end, ms; open loop measures from the *scheduled*
                      send time, so a client that fell behind cannot hide queueing
                      (no coordinated omission); percentiles are over answered requests
  within budget       answered AND latency ≤ that request's budget; the share is over every
                      offered request that carried a budget (errors and client_overload are misses)
  server_budget_met   the gateway's own X-Budget-Met claim, over answered requests with a budget
                      (server time only: it cannot see the network or the client)
  accuracy            correct predictions / answered samples (the model's quality)
  effective accuracy  samples answered correctly AND within budget (no budget: correctly)
                      / every offered sample, errors included: a right answer that came too
                      late, or never, is no use to the caller
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from adaptive_quant.core import stats as core_stats

OVERLOAD = "client_overload"  # open loop: not sent, the in-flight cap was reached
TIMEOUT = "timeout"
CONNECTION = "connection"
BAD_RESPONSE = "bad_response"  # 200 whose body is not the classify contract
CLIENT_BUG = "client_bug"  # the load tester itself failed on this request (logged)


# one per request, up to millions in a long run: slots, no per-instance dict
@dataclass(slots=True)
class RequestRecord:
    t_s: float  # s from the phase's start to the (scheduled) send
    n_samples: int  # images the request carried
    budget_ms: float | None  # the X-Latency-Budget-Ms sent; None = none
    latency_ms: float | None = None  # end to end, ms; None when no answer came
    # None = answered; "503", "timeout", "client_overload", ...
    error_kind: str | None = None
    correct: int = 0  # predictions whose class_id equals the known label
    variants: tuple[str, ...] = ()  # the variant that answered each image
    # X-Precision: one precision, or several joined by commas
    precision: str | None = None
    server_budget_met: bool | None = None  # X-Budget-Met
    server_time_ms: float | None = None  # X-Server-Time-Ms
    # open loop: how much later than scheduled the client sent it
    send_lag_ms: float = 0.0

    @property
    def answered(self) -> bool:
        return self.error_kind is None

    @property
    def within_budget(self) -> bool:
        if not self.answered:
            return False
        return self.budget_ms is None or (self.latency_ms is not None and self.latency_ms <= self.budget_ms)


def percentiles(values: list[float] | np.ndarray) -> dict[str, float | None]:
    """p50/p95/p99/max/mean of `values`; None each when there are none."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    stats = {**core_stats.percentiles(a), "max": a.max(), "mean": a.mean()}
    # to 0.1 µs: more digits would be noise
    return {k: round(float(v), 4) for k, v in stats.items()}


def _share(num: int, den: int) -> float | None:
    return num / den if den else None


def variant_mix_over_time(records: list[RequestRecord], bin_s: float, duration_s: float) -> list[dict[str, Any]]:
    """[{t_s: bin start, counts: {variant: images}}] for consecutive bins by send time, from 0
    to the last send (`duration_s` only when there are no records); empty bins are kept (a
    stall shows as a gap, not as nothing)."""
    if records:
        n_bins = int(max(r.t_s for r in records) // bin_s) + 1
    else:
        n_bins = max(1, math.ceil(duration_s / bin_s - 1e-9))
    bins: list[Counter[str]] = [Counter() for _ in range(n_bins)]
    for r in records:
        if r.answered:
            bins[int(r.t_s // bin_s)].update(r.variants)
    return [{"t_s": round(k * bin_s, 6), "counts": dict(sorted(c.items()))} for k, c in enumerate(bins)]


def memory_summary(
    rss_before: int | None, rss_after: int | None, rss_after_warmup: int | None = None
) -> dict[str, Any]:
    """The gateway's resident memory around a phase, growth in % of the starting size: over the
    whole phase (a fresh gateway grows in its warm-up: ONNX Runtime arenas for new batch shapes)
    and over the recorded load only (what a leak would show)."""

    def pct(a: int | None, b: int | None) -> float | None:
        return round(100.0 * (b - a) / a, 3) if a and b is not None else None

    return {
        "rss_before_bytes": rss_before,
        "rss_after_warmup_bytes": rss_after_warmup,
        "rss_after_bytes": rss_after,
        "growth_pct": pct(rss_before, rss_after),
        "growth_recorded_pct": pct(rss_after_warmup, rss_after),
    }


def routing_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """`routing` counters from /v1/status after minus before (numbers, one level of nesting)."""
    if not before or not after:
        return None
    out: dict[str, Any] = {}
    for key, a in after.items():
        b = before.get(key)
        if isinstance(a, dict):
            b = b if isinstance(b, dict) else {}
            out[key] = {k: v - b.get(k, 0) for k, v in a.items() if isinstance(v, (int, float))}
        elif isinstance(a, (int, float)):
            out[key] = a - (b if isinstance(b, (int, float)) else 0)
    return out


def summarize(records: list[RequestRecord], duration_s: float, bin_s: float = 1.0) -> dict[str, Any]:
    """One phase's records → the summary stored in results.json (see the module docstring)."""
    answered = [r for r in records if r.answered]
    budgeted = [r for r in records if r.budget_ms is not None]
    claimed = [r for r in budgeted if r.answered and r.server_budget_met is not None]
    offered_samples = sum(r.n_samples for r in records)
    answered_samples = sum(r.n_samples for r in answered)
    correct = sum(r.correct for r in answered)
    effective = sum(r.correct for r in answered if r.within_budget)
    mix = Counter(v for r in answered for v in r.variants)
    n_mix = sum(mix.values())
    errors = Counter(r.error_kind for r in records if r.error_kind is not None)
    lags = [r.send_lag_ms for r in records if r.error_kind != OVERLOAD]
    latencies = [r.latency_ms for r in answered if r.latency_ms is not None]
    server_times = [r.server_time_ms for r in answered if r.server_time_ms is not None]
    in_budget = sum(r.within_budget for r in budgeted)
    met = sum(bool(r.server_budget_met) for r in claimed)
    per_s = 1.0 / duration_s if duration_s > 0 else None
    return {
        "requests": len(records),
        "answered": len(answered),
        "samples": offered_samples,
        "answered_samples": answered_samples,
        "errors_by_kind": dict(sorted(errors.items())),
        "latency_ms": percentiles(latencies),
        "server_time_ms": percentiles(server_times),
        "budget_ms": percentiles([r.budget_ms for r in budgeted]) if budgeted else None,
        "within_budget_share": _share(in_budget, len(budgeted)),
        "server_budget_met_share": _share(met, len(claimed)),
        "throughput_rps": len(answered) * per_s if per_s else None,
        "samples_per_s": answered_samples * per_s if per_s else None,
        "accuracy": _share(correct, answered_samples),
        "effective_accuracy": _share(effective, offered_samples),
        "variant_mix": {k: v / n_mix for k, v in sorted(mix.items())},
        "variant_mix_over_time": variant_mix_over_time(records, bin_s, duration_s),
        "send_lag_ms": percentiles(lags) if any(lags) else None,
        "duration_s": duration_s,
    }
