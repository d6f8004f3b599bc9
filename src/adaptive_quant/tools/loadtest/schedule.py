"""What a load test sends and when: arrival times, latency budgets, phases. Pure, seeded.

Every phase of one run replays the same schedule (arrival times, images and budgets), so
the differences between phases come from the gateway, not from the dice.

Arrival modes:
  closed   C workers; each sends its next request when its last one returns (no times here)
  poisson  open loop, exponential inter-arrival times at `rate` req/s
  bursty   open loop, on/off modulated Poisson: `rate` req/s outside bursts and
           `rate × burst_factor` during the last `burst_s` seconds of every `period_s`
           window (calm first, then the burst: the gateway meets each burst warmed up)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from adaptive_quant.core.precision import Precision
from adaptive_quant.core.routing import Priority

Mode = Literal["closed", "poisson", "bursty"]
BudgetKind = Literal["none", "fixed", "uniform", "choice", "lognormal", "calibrated"]
MODES: tuple[str, ...] = ("closed", "poisson", "bursty")

# ----------------------------------------------------------------------------- arrivals


@dataclass(frozen=True)
class ArrivalSpec:
    mode: Mode = "closed"
    rate: float = 100.0  # req/s; bursty: the rate outside bursts
    burst_factor: float = 5.0  # bursty: rate multiplier inside a burst
    burst_s: float = 1.0  # bursty: s of burst at the end of each period
    period_s: float = 5.0  # bursty: s from one burst's start to the next one's

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "closed":
            return
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate must be a positive number of requests/s, got {self.rate}")
        if self.mode == "bursty":
            if not self.burst_factor >= 1:
                raise ValueError(f"burst factor must be >= 1, got {self.burst_factor}")
            if not 0 < self.burst_s < self.period_s:
                raise ValueError(
                    f"burst length must be > 0 and shorter than the period, "
                    f"got burst {self.burst_s} s in a period of {self.period_s} s"
                )

    @property
    def peak_rate(self) -> float:
        """req/s at the busiest instant."""
        return self.rate * (self.burst_factor if self.mode == "bursty" else 1.0)

    @property
    def mean_rate(self) -> float:
        """req/s averaged over whole periods (what --rate means for poisson)."""
        if self.mode != "bursty":
            return self.rate
        share = self.burst_s / self.period_s
        return self.rate * (1 - share + share * self.burst_factor)


def in_burst(spec: ArrivalSpec, t_s: np.ndarray) -> np.ndarray:
    """True where `t_s` (s from the phase start) falls inside a burst window."""
    phase = np.mod(np.asarray(t_s, dtype=np.float64), spec.period_s)
    return phase >= spec.period_s - spec.burst_s


def rate_at(spec: ArrivalSpec, t_s: np.ndarray) -> np.ndarray:
    """Instantaneous arrival rate, req/s, at times `t_s`."""
    t = np.asarray(t_s, dtype=np.float64)
    if spec.mode != "bursty":
        return np.full(t.shape, spec.rate)
    return np.where(in_burst(spec, t), spec.rate * spec.burst_factor, spec.rate)


def arrival_times(spec: ArrivalSpec, duration_s: float, seed: int, max_requests: int | None = None) -> np.ndarray:
    """Open-loop send times, s from the phase start, sorted; (n,) float64.

    Drawn in chunks (so `max_requests` bounds the work, not only the result) of Poisson
    arrivals at the peak rate; bursty arrivals are then thinned, each kept with probability
    rate(t) / peak, which gives exactly the modulated process. The chunk size does not depend
    on `max_requests`: a cut schedule is a prefix of the full one.
    """
    if spec.mode == "closed":
        msg = "closed-loop load has no arrival times: workers send when answered"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    peak = spec.peak_rate
    expected = min(peak * duration_s, 1e6)
    # one chunk almost always covers the phase
    chunk = int(expected + 6 * math.sqrt(expected) + 16)
    parts, n, last = [], 0, 0.0
    while last < duration_s and (max_requests is None or n < max_requests):
        t = last + np.cumsum(rng.exponential(1.0 / peak, size=chunk))
        last = float(t[-1])
        t = t[t < duration_s]
        if spec.mode == "bursty":
            t = t[rng.random(t.shape) < rate_at(spec, t) / peak]
        parts.append(t)
        n += t.size
    times = np.concatenate(parts) if parts else np.zeros(0)
    return times[:max_requests] if max_requests is not None else times


# ----------------------------------------------------------------------------- budgets

BUDGET_FORMS = (
    "none | fixed:MS | uniform:LO,HI | choice:MS1,MS2,... | lognormal:MEDIAN,SIGMA | "
    "calibrated[:MULTIPLIER] (all in ms of end-to-end latency, e.g. fixed:50, uniform:20,80, "
    "choice:10,50,200, lognormal:40,0.5, calibrated:1.25)"
)
_ARITY = {
    "none": (0, 0),
    "fixed": (1, 1),
    "uniform": (2, 2),
    "choice": (1, 64),
    "lognormal": (2, 2),
    "calibrated": (0, 1),
}
# budgets are rounded to this, so the header says exactly what is scored
BUDGET_RESOLUTION_MS = 0.001


@dataclass(frozen=True)
class BudgetSpec:
    kind: BudgetKind = "none"
    # ms, except lognormal's SIGMA and calibrated's multiplier
    params: tuple[float, ...] = ()

    def __str__(self) -> str:
        if not self.params:
            return self.kind
        return f"{self.kind}:" + ",".join(_number(p) for p in self.params)

    @property
    def needs_calibration(self) -> bool:
        return self.kind == "calibrated"

    @property
    def multiplier(self) -> float:
        """calibrated: the factor applied to the calibrated p95."""
        return self.params[0] if self.params else 1.0

    def resolved(self, calibrated_ms: float) -> BudgetSpec:
        """calibrated[:m] → fixed:(calibrated_ms × m); any other spec is returned unchanged."""
        if not self.needs_calibration:
            return self
        return BudgetSpec("fixed", (round(calibrated_ms * self.multiplier, 3),))


def _number(x: float) -> str:
    """1426.861 → '1426.861', 50.0 → '50': exact to BUDGET_RESOLUTION_MS, so the text parses back."""
    return f"{x:.6f}".rstrip("0").rstrip(".")


def _budget_error(text: str, why: str) -> ValueError:
    return ValueError(f"bad budget spec {text!r}: {why}; accepted forms: {BUDGET_FORMS}")


def parse_budget(text: str) -> BudgetSpec:
    """'uniform:20,80' → BudgetSpec('uniform', (20.0, 80.0)); a bad spec is a ValueError naming the forms."""
    kind, _, rest = text.strip().lower().partition(":")
    if kind not in _ARITY:
        raise _budget_error(text, f"unknown kind {kind!r}")
    try:
        params = tuple(float(p) for p in rest.split(",")) if rest.strip() else ()
    except ValueError:
        raise _budget_error(text, "parameters must be numbers separated by commas") from None
    lo, hi = _ARITY[kind]
    if not lo <= len(params) <= hi:
        want = f"{lo}" if lo == hi else f"{lo} to {hi}"
        raise _budget_error(text, f"{kind} takes {want} parameter(s), got {len(params)}")
    if not all(math.isfinite(p) and p > 0 for p in params):
        raise _budget_error(text, "parameters must be positive finite numbers")
    if kind == "uniform" and not params[0] < params[1]:
        raise _budget_error(text, "uniform needs LO < HI")
    return BudgetSpec(kind, params)  # type: ignore[arg-type]


def draw_budgets(spec: BudgetSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) budgets in ms, NaN = no budget; rounded to BUDGET_RESOLUTION_MS, never below it."""
    k, p = spec.kind, spec.params
    if k == "none":
        return np.full(n, np.nan)
    if k == "fixed":
        out = np.full(n, p[0])
    elif k == "uniform":
        out = rng.uniform(p[0], p[1], size=n)
    elif k == "choice":
        out = rng.choice(np.asarray(p), size=n)
    elif k == "lognormal":
        out = rng.lognormal(math.log(p[0]), p[1], size=n)  # median = exp(mu) = MEDIAN
    else:
        raise ValueError(f"budget {spec} must be resolved against a calibration before drawing")
    return np.maximum(np.round(out, 3), BUDGET_RESOLUTION_MS)


class BudgetStream:
    """Budget of request i, for any i, the same in every phase: drawn in chunks, chunk k from
    the generator seeded with (seed, k), so the value never depends on how far a phase got."""

    def __init__(self, spec: BudgetSpec, seed: int, chunk: int = 4096) -> None:
        self.spec, self.seed, self.chunk = spec, seed, chunk
        self._chunks: dict[int, np.ndarray] = {}

    def __getitem__(self, i: int) -> float | None:
        k, j = divmod(i, self.chunk)
        if k not in self._chunks:
            self._chunks[k] = draw_budgets(self.spec, self.chunk, np.random.default_rng([self.seed, k]))
        value = float(self._chunks[k][j])
        return None if math.isnan(value) else value


# ----------------------------------------------------------------------------- images


def image_groups(n_images: int, batch: int, seed: int) -> np.ndarray:
    """(n_requests, batch) indices into the image pool: a seeded shuffle cut into requests;
    request i of a phase carries group i % n_requests. The tail that does not fill a group is dropped."""
    if n_images < batch:
        raise ValueError(f"{n_images} images cannot fill one request of {batch}")
    order = np.random.default_rng(seed).permutation(n_images)
    n = n_images // batch
    return order[: n * batch].reshape(n, batch)


# ----------------------------------------------------------------------------- phases

PHASE_FORMS = (
    "adaptive (the budget as drawn), fp32 | fp16 | int8 (adds X-Min-Precision: never answer below it), "
    "quality | balanced | speed (adds X-Priority)"
)
CALIBRATION = "calibrate"


@dataclass(frozen=True)
class Phase:
    name: str
    priority: str | None = None  # X-Priority
    floor: str | None = None  # X-Min-Precision
    # False: the calibration phase measures with no budget at all
    send_budget: bool = True

    def headers(self) -> dict[str, str]:
        """The headers this phase adds to every request (the budget is per request)."""
        h = {}
        if self.priority:
            h["X-Priority"] = self.priority
        if self.floor:
            h["X-Min-Precision"] = self.floor
        return h


CALIBRATION_PHASE = Phase(CALIBRATION, priority=Priority.SPEED.value, send_budget=False)


def parse_phase(name: str) -> Phase:
    n = name.strip().lower()
    if n == "adaptive":
        return Phase("adaptive")
    if n in {p.value for p in Precision}:
        return Phase(n, floor=n)
    if n in {p.value for p in Priority}:
        return Phase(n, priority=n)
    raise ValueError(f"unknown phase {name!r}; accepted: {PHASE_FORMS}")


def parse_phases(text: str) -> tuple[Phase, ...]:
    """'adaptive,fp32' → (Phase('adaptive'), Phase('fp32', floor='fp32')); duplicates are refused."""
    names = [n for n in (s.strip() for s in text.split(",")) if n]
    if not names:
        raise ValueError(f"no phases given; accepted: {PHASE_FORMS}")
    phases = tuple(parse_phase(n) for n in names)
    seen = [p.name for p in phases]
    dup = sorted({n for n in seen if seen.count(n) > 1})
    if dup:
        raise ValueError(f"phase(s) {', '.join(dup)} given twice; each phase runs once per invocation")
    return phases
