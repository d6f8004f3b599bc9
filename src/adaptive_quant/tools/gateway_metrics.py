"""The gateway's per-version series, read from its /metrics as Prometheus would scrape them.

What `aq-rollout` watches during a canary (the series are summed over the gateway's workers):
- aq_version_requests_total{version, outcome}      requests served by each version, by outcome
- aq_version_budget_total{version, result}         budgeted requests per version, met | missed
- aq_mirror_comparisons_total{version, result}     mirrored samples onto the canary `version`:
                                                   agree | disagree | failed
- aq_model_version_workers{version, state}         workers holding `version` in state loading |
                                                   serving | canary | failed (a live sum)

One GET (`fetch`); the rest is pure parsing with prometheus_client's own text parser.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from adaptive_quant.core.canary import CanaryCounts

REQUESTS = "aq_version_requests_total"
BUDGET = "aq_version_budget_total"
MIRROR = "aq_mirror_comparisons_total"
WORKERS = "aq_model_version_workers"
WORKER_STATES = ("loading", "serving", "canary", "failed")


class GatewayUnreachable(RuntimeError):
    """The gateway's /metrics did not answer (not running, wrong URL, or an error status)."""


def metrics_url(url: str) -> str:
    """http://host:8000 → http://host:8000/metrics (a URL that names /metrics already is kept)."""
    url = url.rstrip("/")
    return url if url.endswith("/metrics") else url + "/metrics"


def fetch(url: str, timeout_s: float = 5.0) -> str:
    """The text of the gateway's /metrics (open without an API key, as Prometheus scrapes it)."""
    target = metrics_url(url)
    try:
        r = httpx.get(target, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise GatewayUnreachable(
            f"cannot reach the gateway at {target} ({type(exc).__name__}: {exc}); is it running, and is --gateway "
            "its base URL (e.g. http://127.0.0.1:8000)?"
        ) from exc
    if r.status_code != 200:
        raise GatewayUnreachable(f"{target} answered {r.status_code}: {r.text[:200]}")
    return r.text


def _samples(text: str, names: set[str]):
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names and "version" in sample.labels:
                try:
                    version = int(sample.labels["version"])
                except ValueError:
                    continue  # not a version number: not ours to judge
                yield sample.name, version, sample.labels, float(sample.value)


def parse_counts(text: str) -> dict[int, CanaryCounts]:
    """version → its cumulative counters, from a /metrics body."""
    raw: dict[int, dict] = {}
    for name, version, labels, value in _samples(text, {REQUESTS, BUDGET, MIRROR}):
        c = raw.setdefault(version, {"requests": {}})
        if name == REQUESTS:
            outcome = labels.get("outcome", "")
            c["requests"][outcome] = c["requests"].get(outcome, 0.0) + value
        elif name == BUDGET and labels.get("result") in ("met", "missed"):
            key = f"budget_{labels['result']}"
            c[key] = c.get(key, 0.0) + value
        elif name == MIRROR and labels.get("result") in ("agree", "disagree", "failed"):
            key = f"mirror_{labels['result']}"
            c[key] = c.get(key, 0.0) + value
    return {v: CanaryCounts(**c) for v, c in raw.items()}


def parse_workers(text: str) -> dict[int, dict[str, int]]:
    """version → {state: how many workers hold it so}, from a /metrics body (states with 0 included)."""
    out: dict[int, dict[str, int]] = {}
    for _, version, labels, value in _samples(text, {WORKERS}):
        states = out.setdefault(version, dict.fromkeys(WORKER_STATES, 0))
        state = labels.get("state", "")
        states[state] = states.get(state, 0) + int(round(value))
    return out


def scrape(url: str, timeout_s: float = 5.0) -> dict[int, CanaryCounts]:
    """version → cumulative counters of the gateway at `url`; GatewayUnreachable when it does not answer."""
    return parse_counts(fetch(url, timeout_s))


def scrape_workers(url: str, timeout_s: float = 5.0) -> dict[int, dict[str, int]]:
    """version → {state: workers} of the gateway at `url` (aq_model_version_workers)."""
    return parse_workers(fetch(url, timeout_s))
