"""The load test's configuration: one typed dataclass, validated on construction.

Bounds are part of the contract: a run is limited in time (`duration_s` ≤ 1 h) and
optionally in count, and it only ever targets a service on this machine (loopback).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from adaptive_quant.core.net import is_loopback
from adaptive_quant.tools.loadtest.schedule import MODES, ArrivalSpec, BudgetSpec, Mode, Phase

MAX_DURATION_S = 3600.0  # s: one hour of load is the most one invocation may apply
MAX_WARMUP_S = 600.0
MAX_CONCURRENCY = 1024  # closed-loop workers; also the connection pool size
MAX_IN_FLIGHT = 4096
MAX_TIMEOUT_S = 600.0
MAX_BATCH = 256  # images per request (the gateway's own limit, 64 by default, may be lower)
# open loop: scheduled requests per phase (their times and records stay in memory)
MAX_ARRIVALS = 2_000_000


class LoadTestConfigError(ValueError):
    """A setting is out of bounds or inconsistent; the message says which and what is accepted."""


V2_PREFIX = "v2+"  # v2+http://host:port: the target is driven over the Open Inference Protocol


def split_protocol(url: str) -> tuple[str, str]:
    """'v2+http://127.0.0.1:8000' → ('v2', 'http://127.0.0.1:8000'); a plain URL is 'v1' (/v1/classify)."""
    if url.startswith(V2_PREFIX):
        return "v2", url[len(V2_PREFIX) :]
    return "v1", url


def check_loopback(url: str) -> str:
    """The base URL without a trailing slash, if its host is this machine (127.0.0.0/8, ::1 or
    localhost); anything else is refused: this tool must never load someone else's service.
    A v2+ prefix (the Open Inference Protocol) is kept."""
    protocol, http_url = split_protocol(url)
    try:
        parts = urlsplit(http_url)
        host = parts.hostname  # lower-cased, IPv6 brackets removed
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        raise LoadTestConfigError(f"--url {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise LoadTestConfigError(
            f"--url {url!r} must look like http://127.0.0.1:8000 (or v2+http://127.0.0.1:8000 for the v2 protocol)"
        )
    if not is_loopback(host):
        raise LoadTestConfigError(
            f"--url {url!r} targets host {host!r}, which is not this machine; the load tester "
            "only drives a service on loopback (127.0.0.1, ::1 or localhost)"
        )
    return url.rstrip("/")


@dataclass(frozen=True)
class LoadTestConfig:
    url: str = "http://127.0.0.1:8000"
    mode: Mode = "closed"
    concurrency: int = 16  # closed loop: workers, each with one request in flight
    rate: float = 100.0  # req/s, open loop (bursty: outside bursts)
    burst_factor: float = 5.0
    burst_s: float = 1.0  # s
    period_s: float = 5.0  # s
    # open loop: arrivals beyond this are counted as client_overload
    max_in_flight: int = 256
    duration_s: float = 30.0  # s of recorded load per phase
    max_requests: int | None = None  # recorded requests per phase, at most
    warmup_s: float = 2.0  # s of unrecorded load before each phase
    timeout_s: float = 30.0  # s per request, end to end, before it counts as a timeout
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    phases: tuple[Phase, ...] = (Phase("adaptive"),)
    # run a speed/no-budget phase first and derive a budget from it
    calibrate: bool = False
    # calibrate against this gateway instead (e.g. one started with --set variants=[int8], so the
    # p95 is a pure INT8 service's at this load); loopback only, like url
    calibrate_url: str | None = None
    batch: int = 1  # images per request
    seed: int = 0
    bin_s: float = 1.0  # s per bin of the variant mix over time
    progress_s: float = 5.0  # s between progress log lines (0 = none)
    # X-API-Key; kept out of repr() and never written to the results
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", check_loopback(self.url))
        if self.calibrate_url is not None:
            object.__setattr__(self, "calibrate_url", check_loopback(self.calibrate_url))
            if split_protocol(self.calibrate_url)[0] != "v1":
                raise LoadTestConfigError("--calibrate-url is driven over /v1/classify: give it without v2+")
            if not self.calibrate:
                raise LoadTestConfigError("--calibrate-url needs --calibrate")
        if self.mode not in MODES:
            raise LoadTestConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self._bounded("--duration", self.duration_s, 0, MAX_DURATION_S, "s", low_open=True)
        self._bounded("--warmup", self.warmup_s, 0, MAX_WARMUP_S, "s")
        self._bounded("--timeout", self.timeout_s, 0, MAX_TIMEOUT_S, "s", low_open=True)
        self._bounded("--bin", self.bin_s, 0, MAX_DURATION_S, "s", low_open=True)
        self._bounded("--progress", self.progress_s, 0, MAX_DURATION_S, "s")
        self._int("--concurrency", self.concurrency, 1, MAX_CONCURRENCY)
        self._int("--max-in-flight", self.max_in_flight, 1, MAX_IN_FLIGHT)
        self._int("--batch", self.batch, 1, MAX_BATCH)
        if self.max_requests is not None:
            self._int("--max-requests", self.max_requests, 1, 10**9)
        try:
            self.arrivals  # noqa: B018  (validates rate and burst shape)
        except ValueError as exc:
            raise LoadTestConfigError(str(exc)) from None
        if self.mode != "closed":
            expected = self.arrivals.mean_rate * self.duration_s
            if self.max_requests is None and expected > MAX_ARRIVALS:
                raise LoadTestConfigError(
                    f"{self.arrivals.mean_rate:g} req/s for {self.duration_s:g} s schedules ~{expected:.3g} requests "
                    f"per phase, more than {MAX_ARRIVALS:,}; lower --rate or --duration, or set --max-requests"
                )
        if not self.phases:
            raise LoadTestConfigError("--phases names no phase")
        if self.budget.needs_calibration and not self.calibrate:
            raise LoadTestConfigError(f"--budget {self.budget} needs --calibrate (it scales the calibrated p95)")

    @staticmethod
    def _bounded(name: str, v: float, lo: float, hi: float, unit: str, low_open: bool = False) -> None:
        bad = not math.isfinite(v) or v > hi or (v <= lo if low_open else v < lo)
        if bad:
            rel = ">" if low_open else ">="
            raise LoadTestConfigError(f"{name} must be {rel} {lo:g} and <= {hi:g} {unit}, got {v:g}")

    @staticmethod
    def _int(name: str, v: int, lo: int, hi: int) -> None:
        if not lo <= v <= hi:
            raise LoadTestConfigError(f"{name} must be between {lo} and {hi}, got {v}")

    @property
    def arrivals(self) -> ArrivalSpec:
        return ArrivalSpec(self.mode, self.rate, self.burst_factor, self.burst_s, self.period_s)

    @property
    def protocol(self) -> str:
        """'v1' (POST /v1/classify, PNG instances) or 'v2' (the Open Inference Protocol, FP32 tensors)."""
        return split_protocol(self.url)[0]

    @property
    def http_url(self) -> str:
        """The URL the connections go to (without the v2+ prefix)."""
        return split_protocol(self.url)[1]

    @property
    def pool_size(self) -> int:
        """Connections to keep: one per request that may be in flight at once."""
        return self.concurrency if self.mode == "closed" else self.max_in_flight

    def to_json(self) -> dict[str, Any]:
        """Every setting, readable in results.json; the API key only as whether one was given."""
        d = asdict(self)
        d.pop("api_key")
        d["api_key_given"] = self.api_key is not None
        d["budget"] = str(self.budget)
        d["phases"] = [p.name for p in self.phases]
        if self.mode != "closed":
            d["mean_rate_rps"] = self.arrivals.mean_rate
        return d
