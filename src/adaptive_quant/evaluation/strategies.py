"""Offline routing simulations on recorded predictions (pure NumPy, no I/O).

Given, for every test sample, which variants classified it right, each variant's latency and
the predictor's p(correct), these functions price a routing strategy as (accuracy, mean
latency, mix). The adaptive router goes through `routing.route_batch`, the very function the
gateway runs, so the offline figures describe production behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from adaptive_quant.core.routing import Priority, RoutingConfig, allowed_mask, route_batch


@dataclass
class PolicyPoint:
    name: str  # strategy, e.g. "adaptive", "random-same-mix", "oracle", "cascade", "fixed"
    param: float | None  # the knob that produced this point (tolerance, threshold, …)
    accuracy: float  # share of samples answered right
    mean_latency_ms: float  # ms per sample, mean
    mix: dict[str, float] = field(default_factory=dict)  # share of samples per variant


def _mix(index: np.ndarray, keys: list[str]) -> dict[str, float]:
    counts = np.bincount(index, minlength=len(keys)) / max(1, len(index))
    return {k: float(c) for k, c in zip(keys, counts)}


def fixed_points(correct: np.ndarray, latency_ms: np.ndarray, keys: list[str]) -> list[PolicyPoint]:
    """Every sample to one variant. correct: (N, V) bool; latency_ms: (V,)."""
    return [
        PolicyPoint(
            "fixed", None, float(correct[:, j].mean()), float(latency_ms[j]), {k: float(k == keys[j]) for k in keys}
        )
        for j in range(len(keys))
    ]


def adaptive_point(
    pred_acc: np.ndarray,
    correct: np.ndarray,
    latency_ms: np.ndarray,
    keys: list[str],
    precisions: list[str],
    priority: Priority,
    config: RoutingConfig,
    budget_ms: float | None = None,
    param: float | None = None,
) -> PolicyPoint:
    """Route every sample with the production policy; score the chosen variant's recorded answer."""
    allowed = allowed_mask(precisions, None)
    decision = route_batch(pred_acc, latency_ms, allowed, budget_ms, priority, config)
    idx = decision.index
    rows = np.arange(len(idx))
    return PolicyPoint(
        "adaptive", param, float(correct[rows, idx].mean()), float(latency_ms[idx].mean()), _mix(idx, keys)
    )


def random_same_mix(point: PolicyPoint, correct: np.ndarray, latency_ms: np.ndarray, keys: list[str]) -> PolicyPoint:
    """Random assignment with the same variant shares: its expected accuracy and latency (exact, no sampling)."""
    shares = np.array([point.mix.get(k, 0.0) for k in keys])
    return PolicyPoint(
        "random-same-mix",
        point.param,
        float(shares @ correct.mean(axis=0)),
        float(shares @ latency_ms),
        dict(point.mix),
    )


def oracle_point(correct: np.ndarray, latency_ms: np.ndarray, keys: list[str]) -> PolicyPoint:
    """Knows the answers: the cheapest variant that is right (the cheapest of all when none is)."""
    order = np.argsort(latency_ms)  # cheapest first
    right_sorted = correct[:, order]
    has_right = right_sorted.any(axis=1)
    first_right = np.where(has_right, right_sorted.argmax(axis=1), 0)
    idx = order[first_right]
    return PolicyPoint("oracle", None, float(has_right.mean()), float(latency_ms[idx].mean()), _mix(idx, keys))


def softmax_confidence(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).max(axis=1)


def cascade_point(
    cheap_logits: np.ndarray,
    correct: np.ndarray,
    latency_ms: np.ndarray,
    keys: list[str],
    cheap: str,
    expensive: str,
    threshold: float,
) -> PolicyPoint:
    """Run `cheap`; escalate to `expensive` when its top softmax probability is under `threshold`.

    An escalated sample pays both latencies (the cheap answer had to be computed to know).
    """
    c, e = keys.index(cheap), keys.index(expensive)
    escalate = softmax_confidence(cheap_logits) < threshold
    right = np.where(escalate, correct[:, e], correct[:, c])
    latency = latency_ms[c] + escalate * latency_ms[e]
    idx = np.where(escalate, e, c)
    return PolicyPoint("cascade", threshold, float(right.mean()), float(latency.mean()), _mix(idx, keys))
