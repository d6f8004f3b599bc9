"""The routing policy: which variant answers a sample. Pure functions, no I/O.

One implementation, vectorised over samples (`route_batch`), serves both the gateway (a
request's N samples at once) and the offline evaluation (the whole test split at once), so
the Pareto report measures exactly what production does. `choose_variant` is the
one-sample view of the same function.

Per sample and variant v (docs/architecture.md, "Routing"):
  allowed(v)  = precision(v) at or above the caller's floor, and v can serve (healthy,
                not already tried and failed for this request)
  feasible(v) = allowed(v) and latency_ms(v) <= budget_ms (always, when there is no budget)
  quality  → the most accurate feasible variant (ties → the faster)
  speed    → the fastest feasible variant whose predicted accuracy is within
             `speed_tolerance` of the best feasible one
  balanced → the feasible variant maximising  acc(v) − accuracy_per_halving · log2(cost_ms(v)),
             i.e. it gives up `accuracy_per_halving` of predicted accuracy for each halving of
             compute. Relative, so the knob means the same at batch 1 and 64, on CPU and GPU.
             cost_ms is the variant's own service time (no queueing; defaults to latency_ms):
             queueing decides feasibility, not the price, or else under load every latency
             approaches the same queue-dominated value, the ratio tends to 1, and the router
             would move samples to the *expensive* variant just when compute is scarce.
             Under load the price rises instead: accuracy_per_halving · (1 + load_price · load),
             load = samples in flight / max batch size.
  nothing feasible → the allowed variant of least compute (cost_ms; else the fastest), budget_met = False
  nothing allowed  → NoVariantAllowed (the gateway answers 503 or 422)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import numpy as np
from pydantic import ConfigDict, Field

from adaptive_quant.core.precision import Precision
from adaptive_quant.core.settings import Section


class Priority(str, Enum):
    QUALITY = "quality"
    BALANCED = "balanced"
    SPEED = "speed"

    @classmethod
    def parse(cls, value: str) -> Priority:
        try:
            return cls(value.strip().lower())
        except ValueError:
            raise ValueError(f"unknown priority {value!r}; accepted: {', '.join(p.value for p in cls)}") from None


class NoVariantAllowed(RuntimeError):
    """No variant is both at/above the floor and able to serve."""


class RoutingConfig(Section):
    """The policy's knobs; validated on construction."""

    model_config = ConfigDict(frozen=True)
    config_key: ClassVar[str] = "routing"

    # speed: how much predicted accuracy (a share, 0.02 = 2 points) a faster variant may give
    # up against the best feasible one
    speed_tolerance: float = Field(0.02, ge=0.0, le=1.0)
    # balanced: predicted accuracy (share) worth one halving of the latency estimate.
    # 0.01 = one point per halving: with int8 ~3× faster than fp32 on CPU (log2 3 ≈ 1.6),
    # int8 answers unless fp32 is predicted ≥1.6 points more likely to be right for the sample.
    accuracy_per_halving: float = Field(0.01, ge=0.0)
    # balanced, under load: accuracy_per_halving × (1 + load_price × load), load = samples in
    # flight / max batch size. A busy server's compute delays everyone queued behind it, so a
    # slower variant must promise more; 0 = the same price at any load. (Under closed-loop load
    # it cut FP32's share by three quarters at the same latency and accuracy.)
    load_price: float = Field(1.0, ge=0.0)
    default_priority: Priority = Field(Priority.BALANCED, strict=False)  # "balanced" → Priority.BALANCED


@dataclass(frozen=True)
class BatchDecision:
    index: np.ndarray  # (N,) int, column of the chosen variant
    budget_met: np.ndarray  # (N,) bool, the chosen variant's estimate fits the budget


@dataclass(frozen=True)
class Decision:
    variant: str
    budget_met: bool  # False: nothing feasible, the fastest allowed variant was taken


_TIE = 1e-9  # accuracies closer than this are equal (ties go to the faster variant)


def allowed_mask(
    precisions: Sequence[Precision | str],
    floor: Precision | None,
    available: Sequence[bool] | None = None,
) -> np.ndarray:
    """(V,) bool: variants at or above `floor` (None = any) that are available."""
    ranks = np.array([Precision(p).rank for p in precisions])
    mask = ranks >= (Precision(floor).rank if floor is not None else -1)
    if available is not None:
        mask &= np.asarray(available, dtype=bool)
    return mask


def route_batch(
    pred_acc: np.ndarray,
    latency_ms: np.ndarray,
    allowed: np.ndarray,
    budget_ms: float | None,
    priority: Priority,
    config: RoutingConfig,
    cost_ms: np.ndarray | None = None,
    load: float = 0.0,
) -> BatchDecision:
    """Choose a variant for each of N samples.

    pred_acc:   (N, V) predicted p(correct | sample, variant)
    latency_ms: (V,) or (N, V) latency estimate per variant, ms (feasibility, fastest choice)
    allowed:    (V,) bool, see `allowed_mask`
    cost_ms:    (V,) compute price per variant for `balanced`, ms (default: latency_ms)
    load:       samples in flight / max batch size now (balanced prices compute higher under load)
    """
    acc = np.asarray(pred_acc, dtype=np.float64)
    if acc.ndim != 2:
        raise ValueError(f"pred_acc must be (N, V), got shape {acc.shape}")
    n, v = acc.shape
    lat = np.asarray(latency_ms, dtype=np.float64)  # (V,) broadcasts against (N, V) below
    if lat.shape not in ((v,), (n, v)):
        raise ValueError(f"latency_ms must be ({v},) or ({n}, {v}), got shape {lat.shape}")
    allowed = np.asarray(allowed, dtype=bool)
    if allowed.shape != (v,):
        raise ValueError(f"allowed must be ({v},), got shape {allowed.shape}")
    if not allowed.any():
        raise NoVariantAllowed("no variant is at or above the precision floor and able to serve")
    if n == 0:
        return BatchDecision(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))

    fits = np.ones((n, v), dtype=bool) if budget_ms is None else lat <= budget_ms
    feasible = np.broadcast_to(fits & allowed, (n, v))  # (N, V)
    any_feasible = feasible.any(axis=1)  # (N,)

    price = lat if cost_ms is None else np.asarray(cost_ms, dtype=np.float64)  # compute per variant
    if priority is Priority.BALANCED:
        # log2 of the latency: only ratios between variants matter (the row's minimum cancels)
        cost = np.log2(np.maximum(price, 1e-6))
        per_halving = config.accuracy_per_halving * (1.0 + config.load_price * max(0.0, load))
        score = np.where(feasible, acc - per_halving * cost, -np.inf)
        best = score.max(axis=1, keepdims=True)
        candidates = feasible & (score >= best - _TIE)
    else:
        tol = config.speed_tolerance if priority is Priority.SPEED else 0.0
        best = np.where(feasible, acc, -np.inf).max(axis=1, keepdims=True)
        candidates = feasible & (acc >= best - tol - _TIE)
    # among the candidates, the fastest. Rows with nothing feasible take the allowed variant of
    # least compute (cost_ms, when given): the budget is lost anyway, and on shared compute the
    # cheapest variant drains the queue soonest; choosing by the live estimate instead let one
    # stall on INT8 send every sample to FP32 for seconds under load
    pool = np.where(any_feasible[:, None], candidates, allowed[None, :])
    order = np.where(any_feasible[:, None], lat, price)
    index = np.where(pool, order, np.inf).argmin(axis=1)
    return BatchDecision(index=index, budget_met=any_feasible)


def choose_variant(
    pred_acc: Mapping[str, float],
    latency_ms: Mapping[str, float],
    precisions: Mapping[str, Precision | str],
    budget_ms: float | None,
    priority: Priority = Priority.BALANCED,
    floor: Precision | None = None,
    config: RoutingConfig = RoutingConfig(),
    available: Mapping[str, bool] | None = None,
) -> Decision:
    """One sample's decision; the same policy as `route_batch` (it calls it)."""
    keys = list(precisions)
    allowed = allowed_mask(
        [precisions[k] for k in keys], floor, None if available is None else [available.get(k, False) for k in keys]
    )
    out = route_batch(
        np.array([[pred_acc[k] for k in keys]]),
        np.array([latency_ms[k] for k in keys]),
        allowed,
        budget_ms,
        priority,
        config,
    )
    return Decision(variant=keys[int(out.index[0])], budget_met=bool(out.budget_met[0]))
