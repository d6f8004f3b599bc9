"""The classify request's headers → typed options (X-Latency-Budget-Ms, X-Priority, X-Min-Precision)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from adaptive_quant.core.precision import Precision
from adaptive_quant.core.routing import Priority
from adaptive_quant.serving.errors import InputError

BUDGET_HEADER = "x-latency-budget-ms"
PRIORITY_HEADER = "x-priority"
FLOOR_HEADER = "x-min-precision"


@dataclass(frozen=True)
class ClassifyOptions:
    budget_ms: float | None  # ms of server time the caller allows; None = no budget
    priority: Priority
    floor: Precision | None  # never answer below this precision; None = any


def parse_options(headers: Mapping[str, str], default_priority: Priority) -> ClassifyOptions:
    """Header values → options; an invalid value is a 422 naming the header and what it accepts."""
    budget = None
    raw = headers.get(BUDGET_HEADER)
    if raw is not None:
        try:
            budget = float(raw)
        except ValueError:
            budget = None
            bad = True
        else:
            bad = not math.isfinite(budget) or budget <= 0
        if bad:
            raise InputError(
                f"X-Latency-Budget-Ms must be a positive number of milliseconds (e.g. 10 or 2.5), got {raw!r}; "
                "leave the header out for no budget"
            )
    priority = default_priority
    raw = headers.get(PRIORITY_HEADER)
    if raw is not None:
        try:
            priority = Priority.parse(raw)
        except ValueError as exc:
            raise InputError(f"X-Priority: {exc}") from None
    floor = None
    raw = headers.get(FLOOR_HEADER)
    if raw is not None:
        try:
            floor = Precision.parse(raw)
        except ValueError as exc:
            raise InputError(f"X-Min-Precision: {exc}") from None
    return ClassifyOptions(budget, priority, floor)
