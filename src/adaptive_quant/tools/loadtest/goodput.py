"""Goodput: the highest Poisson arrival rate at which a given share of requests is answered
within a given latency budget (default: 99 % within 50 ms), found by a search over rates.

What a caller with a deadline can count on: throughput at concurrency N says how fast a server
is when the client waits for it; goodput says how much open-loop traffic it takes before its
tail breaks the deadline. A request counts as good when it is answered (HTTP 200, one prediction
per image) and its client-measured latency, from the *scheduled* send, is within the budget;
errors, timeouts and arrivals the client could not send are misses (stats.RequestRecord).

The search (pure, `RateSearch`): probe `start_rps`; while probes pass, multiply the rate by
`growth`; after the first failure, bisect geometrically between the highest passing and the
lowest failing rate until they are within `resolution` (5 %: fail/pass ≤ 1.05). A single probe
is a sample of a noisy system; the probes are all reported, and each target's search is
interleaved with the others' (`search_goodput`), so slow drift on the machine hits all alike.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from adaptive_quant.tools.loadtest.config import LoadTestConfig, LoadTestConfigError
from adaptive_quant.tools.loadtest.schedule import BudgetSpec, Phase
from adaptive_quant.tools.loadtest.stats import RequestRecord, percentiles

log = logging.getLogger(__name__)

MAX_PROBES = 40  # per target: a search that has not converged by then reports what it has


@dataclass(frozen=True)
class GoodputSpec:
    budget_ms: float = 50.0  # ms, client-measured end to end
    share: float = 0.99  # of offered requests that must be good
    start_rps: float = 100.0  # first probe, req/s
    max_rps: float = 5000.0  # never probe above this, req/s
    growth: float = 2.0  # rate multiplier while probes pass
    resolution: float = 0.05  # stop when lowest fail / highest pass <= 1 + resolution
    probe_s: float = 10.0  # s of recorded load per probe
    warmup_s: float = 2.0  # s of unrecorded load at the probe's rate before it
    settle_s: float = 1.0  # s of quiet between probes (queues drain, the loop idles)
    send_budget: bool = True  # send the budget as X-Latency-Budget-Ms (the gateway plans with it)
    # a failing probe is extended by one more probe at the same rate and judged on all its
    # requests (2 × probe_s): on a shared VM a single stall of the host can fail a 10 s probe of
    # either server at a rate it holds for minutes (seen: 96 % at 200 req/s, then 100 % for 20 s)
    extend_failures: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> LoadTestConfigError:
            return LoadTestConfigError(f"--goodput-{name}: {why}")

        if not (math.isfinite(self.budget_ms) and self.budget_ms > 0):
            raise bad("budget", f"must be a number of ms > 0, got {self.budget_ms:g}")
        if not 0 < self.share <= 1:
            raise bad("share", f"must be in (0, 1], e.g. 0.99, got {self.share:g}")
        if not 0 < self.start_rps <= self.max_rps:
            raise bad("start", f"must be > 0 and <= --goodput-max ({self.max_rps:g}), got {self.start_rps:g}")
        if not self.growth > 1:
            raise bad("growth", f"must be > 1, got {self.growth:g}")
        if not 0 < self.resolution < 1:
            raise bad("resolution", f"must be in (0, 1), e.g. 0.05, got {self.resolution:g}")
        if not self.probe_s > 0 or self.warmup_s < 0 or self.settle_s < 0:
            raise bad("probe", "probe duration must be > 0 s, warm-up and settle >= 0 s")


def good_share(records: Sequence[RequestRecord], budget_ms: float) -> float:
    """Share of offered requests answered within `budget_ms` (errors are misses); 0 when none."""
    if not records:
        return 0.0
    good = sum(r.answered and r.latency_ms is not None and r.latency_ms <= budget_ms for r in records)
    return good / len(records)


@dataclass
class Probe:
    rate_rps: float
    good_share: float
    passed: bool
    requests: int
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    send_lag_p99_ms: float | None  # how far the client fell behind its schedule (a client-side limit)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RateSearch:
    """Exponential growth, then geometric bisection (module docstring). Pure: feed it results."""

    spec: GoodputSpec
    probes: list[Probe] = field(default_factory=list)
    best_pass: float | None = None  # highest passing rate so far, req/s
    lowest_fail: float | None = None  # lowest failing rate so far, req/s

    def next_rate(self) -> float | None:
        """The next rate to probe, or None when the search is over."""
        s = self.spec
        if len(self.probes) >= MAX_PROBES:
            return None
        if self.lowest_fail is None:  # still growing
            if self.best_pass is None:
                return s.start_rps if not self.probes else None
            if self.best_pass >= s.max_rps:
                return None  # passes at the cap: goodput >= max_rps
            return min(self.best_pass * s.growth, s.max_rps)
        if self.best_pass is None:  # failed at the start: go down until something passes
            nxt = self.lowest_fail / s.growth
            return nxt if nxt >= s.start_rps / s.growth**4 else None  # 16× below the start: give up
        if self.lowest_fail / self.best_pass <= 1 + s.resolution:
            return None
        return math.sqrt(self.best_pass * self.lowest_fail)

    def record(self, probe: Probe) -> None:
        self.probes.append(probe)
        if probe.passed:
            self.best_pass = max(self.best_pass or 0.0, probe.rate_rps)
        else:
            self.lowest_fail = min(self.lowest_fail or math.inf, probe.rate_rps)

    @property
    def done(self) -> bool:
        return self.next_rate() is None

    def result(self) -> dict[str, Any]:
        return {
            "goodput_rps": self.best_pass or 0.0,
            "lowest_failing_rps": self.lowest_fail,
            "capped": self.lowest_fail is None and self.best_pass is not None,  # passed at max_rps
            "probes": [p.to_json() for p in self.probes],
        }


def probe_config(base: LoadTestConfig, url: str, spec: GoodputSpec, rate: float) -> LoadTestConfig:
    """One probe's load-test config: Poisson at `rate`, one phase, the fixed budget."""
    return replace(
        base,
        url=url,
        mode="poisson",
        rate=rate,
        duration_s=spec.probe_s,
        warmup_s=spec.warmup_s,
        max_requests=None,
        budget=BudgetSpec("fixed", (spec.budget_ms,)) if spec.send_budget else BudgetSpec("none"),
        phases=(Phase("adaptive"),),
        calibrate=False,
        calibrate_url=None,
        progress_s=0.0,
    )


def probe_from_records(records: Sequence[RequestRecord], rate: float, spec: GoodputSpec) -> Probe:
    share = good_share(records, spec.budget_ms)
    lat = percentiles([r.latency_ms for r in records if r.answered and r.latency_ms is not None])
    lags = percentiles([r.send_lag_ms for r in records])
    return Probe(
        rate_rps=round(rate, 3),
        good_share=round(share, 5),
        passed=share >= spec.share,
        requests=len(records),
        p50_ms=lat["p50"],
        p99_ms=lat["p99"],
        errors=sum(not r.answered for r in records),
        send_lag_p99_ms=lags["p99"],
    )


RunProbe = Callable[[LoadTestConfig], list[RequestRecord]]


def search_goodput(
    base: LoadTestConfig, targets: dict[str, str], spec: GoodputSpec, run_probe: RunProbe
) -> dict[str, dict[str, Any]]:
    """{name: url} → {name: RateSearch.result() + url}, the searches interleaved probe by probe.
    `run_probe(cfg)` applies one probe's load and returns its records (the runner, or a test's)."""
    searches = {name: RateSearch(spec) for name in targets}
    while True:
        pending = [(n, s.next_rate()) for n, s in searches.items() if not s.done]
        if not pending:
            break
        for name, rate in pending:
            assert rate is not None
            records = run_probe(probe_config(base, targets[name], spec, rate))
            probe = probe_from_records(records, rate, spec)
            if not probe.passed and spec.extend_failures and probe.good_share >= spec.share - 0.25:
                log.info(
                    "goodput %s: %.0f req/s failed (%.2f%%); extending the probe", name, rate, 100 * probe.good_share
                )
                records = records + run_probe(probe_config(base, targets[name], spec, rate))
                probe = probe_from_records(records, rate, spec)
            searches[name].record(probe)
            log.info(
                "goodput %s: %.0f req/s → %.2f%% within %g ms (p99 %s ms, %d errors) %s",
                name,
                rate,
                100 * probe.good_share,
                spec.budget_ms,
                "-" if probe.p99_ms is None else f"{probe.p99_ms:.1f}",
                probe.errors,
                "pass" if probe.passed else "FAIL",
            )
            if spec.settle_s:
                time.sleep(spec.settle_s)
    return {name: {"url": targets[name], **s.result()} for name, s in searches.items()}


def runner_probe(workload: Any) -> RunProbe:
    """The real probe: one phase of the load-test runner over HTTP."""
    from adaptive_quant.tools.loadtest.runner import Runner

    def run(cfg: LoadTestConfig) -> list[RequestRecord]:
        result = asyncio.run(Runner(cfg, workload).run())
        return result.phases["adaptive"].records

    return run


def format_goodput(results: dict[str, dict[str, Any]], spec: GoodputSpec, reference: str | None = None) -> str:
    """One line per target: goodput, its ratio to `reference`, and the probes' trail."""
    ref = results.get(reference, {}).get("goodput_rps") if reference else None
    head = f"goodput: highest Poisson rate with >= {spec.share:.1%} of requests within {spec.budget_ms:g} ms"
    lines = [head, f"{'target':<12} {'goodput req/s':>14} {'ratio':>7}  probes (req/s: share within budget)"]
    for name, r in results.items():
        g = r["goodput_rps"]
        ratio = f"{g / ref:.2f}x" if ref else "-"
        more = "+" if r["capped"] else ""
        trail = ", ".join(f"{p['rate_rps']:.0f}:{p['good_share']:.3f}" for p in r["probes"])
        lines.append(f"{name:<12} {g:>13.0f}{more} {ratio:>7}  {trail}")
    return "\n".join(lines)
