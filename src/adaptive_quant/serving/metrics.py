"""Prometheus metrics of the gateway, in a registry of their own per app instance.

A private CollectorRegistry (not the process-global default) lets tests and benchmarks
create several apps in one process without "Duplicated timeseries" errors.

With several gateway processes on one port (serving/workers.py) the supervisor sets
PROMETHEUS_MULTIPROC_DIR before it starts them: prometheus_client then keeps every value in a
per-process file there, and /metrics sums the files of all workers (gauges of live workers only),
so a scrape that lands on any worker sees the whole gateway. `value()` stays this process's own.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own name; read when it is imported

# s; backend calls on CPU take ~0.2 ms (int8, batch 1) to tens of ms (fp32, batch 64)
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# s; a routing decision (router + planner, or the single-stage policy) per request is tens of µs
DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2)

# cancelled: cut by the drain timeout at shutdown (or the task was cancelled otherwise)
OUTCOMES = ("ok", "client_error", "unavailable", "error", "cancelled")
# a model version's state in one worker (aq_model_version_workers; serving/versions.py)
VERSION_STATES = ("loading", "serving", "canary", "failed")
MIRROR_RESULTS = ("agree", "disagree", "failed")


class GatewayMetrics:
    """Every metric the gateway exports; `render()` is the /metrics body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "aq_requests",
            "Classify requests by outcome (ok, client_error, unavailable, error, cancelled)",
            ["outcome"],
            registry=r,
        )
        self.samples_routed = Counter(
            "aq_samples_routed", "Samples answered, by the variant that answered them", ["variant"], registry=r
        )
        self.backend_latency = Histogram(
            "aq_backend_latency_seconds",
            "Backend call latency per variant, s",
            ["variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.budget = Counter(
            "aq_budget", "Requests with a latency budget, by whether it was met", ["result"], registry=r
        )
        self.fallbacks = Counter(
            "aq_fallbacks",
            "Backend calls retried on another variant, by failed variant and reason",
            ["variant", "reason"],
            registry=r,
        )
        self.decision_time = Histogram(
            "aq_routing_decision_seconds",
            "Time to route one request's samples (router + planner, or the single-stage policy), s",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.request_time = Histogram(
            "aq_request_duration_seconds", "Server time of classify requests, s", buckets=LATENCY_BUCKETS, registry=r
        )
        self.unauthorized = Counter("aq_unauthorized", "Requests refused with 401 (no or wrong API key)", registry=r)
        self.in_flight = Gauge(
            "aq_in_flight_requests",
            "Classify requests being served now",
            registry=r,
            multiprocess_mode="livesum",  # several workers: the sum over the live ones
        )
        self.variant_in_flight = Gauge(
            "aq_variant_in_flight_samples",
            "Samples dispatched to a variant and not yet answered",
            ["variant"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.followups = Counter(
            "aq_followups",
            "Samples that got a follow-up plan after the entry pass, by plan (two-stage routing)",
            ["plan"],
            registry=r,
        )
        # with aq_samples_routed (samples by entry variant): the escalation rate of each entry, the
        # cheap entry's (the speed router's) among them; a plan name repeats once per entry
        self.entry_followups = Counter(
            "aq_entry_followups",
            "Samples that got a follow-up plan, by the entry variant they entered on and plan (two-stage routing)",
            ["entry", "plan"],
            registry=r,
        )
        self.followup_passes_lost = Counter(
            "aq_followup_passes_lost",
            "Follow-up passes (sample x pass) whose answer did not count: cut at the deadline, or failed",
            ["reason"],
            registry=r,
        )
        # model versions (the roll-out contract, section 4): `version` is the number as a string
        self.version_requests = Counter(
            "aq_version_requests",
            "Classify requests by the model version that served them and outcome (as aq_requests)",
            ["version", "outcome"],
            registry=r,
        )
        self.version_budget = Counter(
            "aq_version_budget",
            "Requests with a latency budget, by the model version that served them and whether it was met",
            ["version", "result"],
            registry=r,
        )
        self.mirror_comparisons = Counter(
            "aq_mirror_comparisons",
            "Samples of the serving version's requests mirrored onto the canary `version`: top-1 of the same "
            "variant's entry logits agree, disagree, or the mirrored call failed",
            ["version", "result"],
            registry=r,
        )
        self.version_workers = Gauge(
            "aq_model_version_workers",
            "Gateway workers holding the model version in the state (loading, serving, canary, failed)",
            ["version", "state"],
            registry=r,
            multiprocess_mode="livesum",  # 0/1 per worker, summed over the live ones
        )
        for reason in ("cut", "failed"):
            self.followup_passes_lost.labels(reason)
        for outcome in OUTCOMES:  # export zeros from the start, so dashboards see every series
            self.requests.labels(outcome)
        for result in ("met", "missed"):
            self.budget.labels(result)

    def declare_plans(self, plans: list[str], entry: str | None = None) -> None:
        """Zeros for the plans' series (and per entry variant, when given)."""
        for name in plans:
            self.followups.labels(name)
            if entry is not None:
                self.entry_followups.labels(entry, name)

    def declare_version(self, version: str) -> None:
        """Zeros for a version's series from the moment it can serve, so a scrape sees every one."""
        for outcome in OUTCOMES:
            self.version_requests.labels(version, outcome)
        for result in ("met", "missed"):
            self.version_budget.labels(version, result)

    def declare_mirrors(self, version: str) -> None:
        for result in MIRROR_RESULTS:
            self.mirror_comparisons.labels(version, result)

    def declare_variants(self, keys: list[str]) -> None:
        for k in keys:
            self.samples_routed.labels(k)
            self.backend_latency.labels(k)
            self.variant_in_flight.labels(k)

    def render(self) -> bytes:
        path = os.environ.get(MULTIPROC_ENV)
        if not path:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=path)
        return generate_latest(merged)

    def value(self, name: str, **labels: str) -> float:
        """Current value of one sample (e.g. 'aq_requests_total', outcome='ok'); 0 if absent."""
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v
