"""The canary's verdict: wait, promote or roll back, from the gateway's per-version counters.

Pure: `aq-rollout` scrapes the gateway's /metrics (tools/gateway_metrics.py) once a second, takes the
difference from the snapshot it took when the gateway began to hold the canary, and asks `decide`.

Three signals, each read over the same window for the canary and the serving version:
- errors: the share of the canary's requests that did not end "ok" (absolute, 0..1);
- latency: the canary's share of budgeted requests answered within their budget, against the
  serving version's share in the same window (points; the load is the same for both);
- agreement: the share of mirrored samples (a sample of the serving version's requests, run again on
  the canary's same variant) on which both versions give the same top-1. Agreement is the one signal
  that catches a network that runs fine but answers wrongly (a permuted class order, a wrong
  normalisation, a stale checkpoint): such a network has no errors and meets every budget, and the
  caller's labels are never known to the gateway.

Early roll-back only on a clear failure: the figure stays beyond its limit even at the edge of a
3-sigma (Wilson) interval, so a few unlucky samples early on do not end a good roll-out. Promotion
only when `canary_seconds` have passed, enough traffic was seen to judge (min_requests canary
requests, min_mirrored comparisons) and every signal holds by its point estimate. Too little
traffic at the end rolls back, saying so: a version nobody was able to judge is not promoted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

OK = "ok"
EARLY_Z = 3.0  # Wilson interval width (sigmas) for early roll-back: a clear failure, not an unlucky minute

Action = Literal["wait", "promote", "rollback"]


@dataclass(frozen=True)
class CanaryCounts:
    """One version's counters, as scraped (cumulative) or as a difference of two scrapes."""

    requests: dict[str, float] = field(default_factory=dict)  # outcome → requests (ok, error, ...)
    budget_met: float = 0.0  # requests that carried a budget and met it
    budget_missed: float = 0.0
    mirror_agree: float = 0.0  # mirrored samples (onto this version as the canary) with the same top-1
    mirror_disagree: float = 0.0
    mirror_failed: float = 0.0  # the canary's mirror run raised

    @property
    def total(self) -> float:
        return float(sum(self.requests.values()))

    @property
    def errors(self) -> float:
        return float(sum(n for outcome, n in self.requests.items() if outcome != OK))

    @property
    def budgeted(self) -> float:
        return self.budget_met + self.budget_missed

    @property
    def mirrored(self) -> float:
        """Mirrored comparisons with an answer from both versions (what agreement is measured on)."""
        return self.mirror_agree + self.mirror_disagree

    def since(self, before: CanaryCounts) -> CanaryCounts:
        """The counts added after `before` (clamped at 0: a restarted worker's counters start again)."""
        outcomes = set(self.requests) | set(before.requests)
        return CanaryCounts(
            requests={o: max(0.0, self.requests.get(o, 0.0) - before.requests.get(o, 0.0)) for o in outcomes},
            budget_met=max(0.0, self.budget_met - before.budget_met),
            budget_missed=max(0.0, self.budget_missed - before.budget_missed),
            mirror_agree=max(0.0, self.mirror_agree - before.mirror_agree),
            mirror_disagree=max(0.0, self.mirror_disagree - before.mirror_disagree),
            mirror_failed=max(0.0, self.mirror_failed - before.mirror_failed),
        )


def counts_since(now: dict[int, CanaryCounts], before: dict[int, CanaryCounts], version: int) -> CanaryCounts:
    """Version `version`'s counts between two scrapes (a version absent from a scrape counts as zeros)."""
    return now.get(version, CanaryCounts()).since(before.get(version, CanaryCounts()))


@dataclass(frozen=True)
class CanaryThresholds:
    min_agreement: float = 0.85  # share of mirrored samples with the serving version's top-1, 0..1
    min_mirrored: int = 100  # comparisons needed before agreement is judged (0: agreement not required)
    max_error_rate: float = 0.01  # share of the canary's requests not "ok", 0..1
    max_budget_drop_points: float = 2.0  # canary's within-budget share at most this many points below serving's
    min_requests: int = 100  # canary requests needed to judge errors and latency

    def __post_init__(self) -> None:
        if not 0 <= self.min_agreement <= 1:
            raise ValueError(f"min_agreement must be a share in 0..1, got {self.min_agreement}")
        if not 0 <= self.max_error_rate <= 1:
            raise ValueError(f"max_error_rate must be a share in 0..1, got {self.max_error_rate}")
        if self.min_mirrored < 0 or self.min_requests < 0:
            raise ValueError("min_mirrored and min_requests must be >= 0")
        if self.max_budget_drop_points < 0:
            raise ValueError(f"max_budget_drop_points must be >= 0 (points), got {self.max_budget_drop_points}")


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str  # readable, with the figures
    figures: dict[str, Any]


def wilson(successes: float, n: float, z: float) -> tuple[float, float]:
    """The Wilson score interval of a share successes/n (0..1); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def figures_of(serving: CanaryCounts, canary: CanaryCounts, elapsed_s: float) -> dict[str, Any]:
    """The figures a decision and a progress line report (shares 0..1, None where nothing was counted)."""
    canary_wb = _share(canary.budget_met, canary.budgeted)
    serving_wb = _share(serving.budget_met, serving.budgeted)
    return {
        "elapsed_s": round(elapsed_s, 1),
        "canary_requests": int(canary.total),
        "canary_errors": int(canary.errors),
        "error_rate": _share(canary.errors, canary.total),
        "serving_requests": int(serving.total),
        "mirrored": int(canary.mirrored),
        "mirror_failed": int(canary.mirror_failed),
        "agreement": _share(canary.mirror_agree, canary.mirrored),
        "canary_within_budget": canary_wb,
        "serving_within_budget": serving_wb,
        "budget_drop_points": (serving_wb - canary_wb) * 100
        if canary_wb is not None and serving_wb is not None
        else None,
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"


def describe(f: dict[str, Any]) -> str:
    """One line of figures: what `aq-rollout` prints every second and writes into its decisions."""
    d = f["budget_drop_points"]
    drop = "" if d is None else f" ({d:.1f} points below)" if d >= 0 else f" ({-d:.1f} points above)"
    return (
        f"canary {f['canary_requests']} requests, {f['canary_errors']} errors "
        f"({_pct(f['error_rate'])}); mirrored {f['mirrored']} (failed {f['mirror_failed']}), "
        f"agreement {_pct(f['agreement'])}; within budget {_pct(f['canary_within_budget'])} "
        f"vs serving {_pct(f['serving_within_budget'])}{drop}"
    )


def _early_failures(serving: CanaryCounts, canary: CanaryCounts, t: CanaryThresholds) -> list[str]:
    """Failures clear enough to stop now: beyond the limit at the edge of a 3-sigma interval."""
    out = []
    if canary.mirrored >= max(t.min_mirrored, 1):
        _, upper = wilson(canary.mirror_agree, canary.mirrored, EARLY_Z)
        if upper < t.min_agreement:
            out.append(
                f"agreement with the serving version {canary.mirror_agree / canary.mirrored:.2%} on "
                f"{canary.mirrored:.0f} mirrored samples, far below the minimum {t.min_agreement:.2%}"
            )
    if canary.total >= max(t.min_requests, 1):
        lower, _ = wilson(canary.errors, canary.total, EARLY_Z)
        if lower > t.max_error_rate:
            out.append(
                f"{canary.errors:.0f} of {canary.total:.0f} canary requests failed "
                f"({canary.errors / canary.total:.2%}), far above the limit {t.max_error_rate:.2%}"
            )
    if canary.budgeted >= max(t.min_requests, 1) and serving.budgeted > 0:
        _, upper = wilson(canary.budget_met, canary.budgeted, EARLY_Z)
        serving_wb = serving.budget_met / serving.budgeted
        if (serving_wb - upper) * 100 > t.max_budget_drop_points:
            out.append(
                f"within budget {canary.budget_met / canary.budgeted:.2%} against the serving version's "
                f"{serving_wb:.2%}, far more than {t.max_budget_drop_points:g} points below"
            )
    return out


def _final_failures(serving: CanaryCounts, canary: CanaryCounts, t: CanaryThresholds) -> list[str]:
    """Every signal by its point estimate, once the canary's time is up."""
    out = []
    if canary.total < t.min_requests:
        out.append(f"too little traffic to judge: {canary.total:.0f} canary requests, at least {t.min_requests} needed")
    elif canary.total and canary.errors / canary.total > t.max_error_rate:
        out.append(
            f"{canary.errors:.0f} of {canary.total:.0f} canary requests failed "
            f"({canary.errors / canary.total:.2%}), above the limit {t.max_error_rate:.2%}"
        )
    if canary.mirrored < t.min_mirrored:
        out.append(
            f"too little traffic to judge: {canary.mirrored:.0f} mirrored comparisons, at least {t.min_mirrored} needed"
        )
    elif canary.mirrored and canary.mirror_agree / canary.mirrored < t.min_agreement:
        out.append(
            f"agreement with the serving version {canary.mirror_agree / canary.mirrored:.2%} on "
            f"{canary.mirrored:.0f} mirrored samples, below the minimum {t.min_agreement:.2%}"
        )
    attempted = canary.mirrored + canary.mirror_failed
    if attempted >= max(t.min_mirrored, 1) and canary.mirror_failed / attempted > t.max_error_rate:
        out.append(
            f"{canary.mirror_failed:.0f} of {attempted:.0f} mirrored runs failed on the canary "
            f"({canary.mirror_failed / attempted:.2%}), above the limit {t.max_error_rate:.2%}"
        )
    if canary.budgeted and serving.budgeted:
        drop = (serving.budget_met / serving.budgeted - canary.budget_met / canary.budgeted) * 100
        if drop > t.max_budget_drop_points:
            out.append(
                f"within budget {canary.budget_met / canary.budgeted:.2%} against the serving version's "
                f"{serving.budget_met / serving.budgeted:.2%}: {drop:.1f} points below, more than "
                f"{t.max_budget_drop_points:g}"
            )
    return out


def decide(
    serving: CanaryCounts,
    canary: CanaryCounts,
    thresholds: CanaryThresholds,
    elapsed_s: float,
    canary_seconds: float,
) -> Verdict:
    """The verdict on counts since the canary started (both versions over the same window)."""
    figures = figures_of(serving, canary, elapsed_s)
    early = _early_failures(serving, canary, thresholds)
    if early:
        return Verdict(
            "rollback", f"rolled back after {elapsed_s:.0f} s: {'; '.join(early)} ({describe(figures)})", figures
        )
    if elapsed_s < canary_seconds:
        return Verdict("wait", f"{canary_seconds - elapsed_s:.0f} s left: {describe(figures)}", figures)
    final = _final_failures(serving, canary, thresholds)
    if final:
        return Verdict(
            "rollback", f"rolled back after {elapsed_s:.0f} s: {'; '.join(final)} ({describe(figures)})", figures
        )
    return Verdict("promote", f"promoted after {elapsed_s:.0f} s, every signal held: {describe(figures)}", figures)
