"""Routing options of a request → typed ClassifyOptions. The REST front reads them from headers
(X-Latency-Budget-Ms, X-Priority, X-Min-Precision), the Open Inference Protocol front from
request parameters (v2_codec.py); both validate with the functions here, so a bad value gets the
same explanation, naming the header or parameter it came in."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
    # one variant key, and only it, answers (no routing, no follow-ups): what a caller asking
    # Triton for a variant model by name (cifar_resnet_int8) expects; None = routed
    variant: str | None = None


def parse_budget(raw: object, name: str = "X-Latency-Budget-Ms") -> float:
    """A positive, finite number of ms (a string from a header, a number from a parameter)."""
    bad = isinstance(raw, bool)  # JSON true is not a budget, though Python calls it 1
    try:
        budget = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        budget, bad = math.nan, True
    if bad or not math.isfinite(budget) or budget <= 0:
        raise InputError(
            f"{name} must be a positive number of milliseconds (e.g. 10 or 2.5), got {raw!r}; "
            "leave it out for no budget"
        )
    return budget


def _parse_choice(cls: type[Priority] | type[Precision], raw: object, name: str) -> Any:
    """A string naming one member of `cls` (Priority, Precision), case-insensitive; else a 422 naming `name`."""
    try:
        if not isinstance(raw, str):
            raise ValueError(f"expected a string, got {raw!r}; accepted: {', '.join(p.value for p in cls)}")
        return cls.parse(raw)
    except ValueError as exc:
        raise InputError(f"{name}: {exc}") from None


def parse_priority(raw: object, name: str = "X-Priority") -> Priority:
    return _parse_choice(Priority, raw, name)


def parse_floor(raw: object, name: str = "X-Min-Precision") -> Precision:
    return _parse_choice(Precision, raw, name)


def parse_options(headers: Mapping[str, str], default_priority: Priority) -> ClassifyOptions:
    """Header values → options; an invalid value is a 422 naming the header and what it accepts."""
    raw = headers.get(BUDGET_HEADER)
    budget = None if raw is None else parse_budget(raw)
    raw = headers.get(PRIORITY_HEADER)
    priority = default_priority if raw is None else parse_priority(raw)
    raw = headers.get(FLOOR_HEADER)
    floor = None if raw is None else parse_floor(raw)
    return ClassifyOptions(budget, priority, floor)
