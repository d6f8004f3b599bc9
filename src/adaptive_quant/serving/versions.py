"""The model versions one gateway worker serves: the version set requests pick from, and the
book of every version this worker has held (its state, since when, why), for /v1/status and the
aq_model_version_workers gauge.

`VersionSet` is immutable and swapped as one reference (`ClassifierService.set_versions`): a
request picks its version once (`pick`: the canary with probability `share`) and is served
wholly by it, while the follower (follower.py) swaps sets between requests. The book records
what the follower did; a roll-out tool reads the gauge (summed over the workers) to know when
every worker holds a version.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from adaptive_quant.core.versions import utc_now
from adaptive_quant.serving.metrics import OUTCOMES, GatewayMetrics
from adaptive_quant.serving.model import ServedModel

# a version's state in this worker; loading, serving, canary and failed are the gauge's states
LOADING, SERVING, CANARY, FAILED, RETIRED = "loading", "serving", "canary", "failed", "retired"


@dataclass(frozen=True, eq=False, slots=True)
class VersionSet:
    """What requests are served with now: the serving version, and a canary taking `share` of
    the requests and `mirror_share` of the serving version's as mirrors (mirror.py)."""

    serving: ServedModel
    canary: ServedModel | None = None
    share: float = 0.0  # 0..1, the canary's share of requests
    mirror_share: float = 0.0  # 0..1, the serving version's requests also run on the canary

    def pick(self) -> ServedModel:
        """The version one request is served by (read once per request)."""
        canary = self.canary
        if canary is not None and random.random() < self.share:
            return canary
        return self.serving

    def live(self) -> list[ServedModel]:
        return [self.serving] if self.canary is None else [self.serving, self.canary]

    def find(self, version: int) -> ServedModel | None:
        """The live model of `version`, or None."""
        return next((m for m in self.live() if m.version == version), None)


@dataclass(slots=True)
class VersionRecord:
    """One version as this worker knows it."""

    version: int
    state: str
    since: str  # UTC ISO time it entered the state
    detail: str = ""
    model: ServedModel | None = None  # loaded (or being drained); None once unloaded or never loaded


@dataclass
class VersionBook:
    """Every version this worker has held, and the gauge of their states (0/1 per worker)."""

    metrics: GatewayMetrics
    records: dict[int, VersionRecord] = field(default_factory=dict)

    def set_state(self, version: int, state: str, detail: str = "", model: ServedModel | None = None) -> None:
        """Move `version` to `state` (and keep `model` when given); the gauge follows: the old
        state's series to 0, the new one's to 1 (retired has no series: it holds nothing)."""
        rec = self.records.get(version)
        old = rec.state if rec else None
        gauge = self.metrics.version_workers
        if old is not None and old != RETIRED:
            gauge.labels(str(version), old).set(0)
        if state != RETIRED:
            gauge.labels(str(version), state).set(1)
        if rec is None:
            rec = self.records[version] = VersionRecord(version, state, utc_now(), detail, model)
        elif old != state or detail != rec.detail:
            rec.state, rec.since, rec.detail = state, utc_now() if old != state else rec.since, detail
        if model is not None:
            rec.model = model

    def state(self, version: int) -> str | None:
        rec = self.records.get(version)
        return rec.state if rec else None

    def to_json(self) -> list[dict[str, Any]]:
        """/v1/status "versions": newest first."""
        out = []
        for v in sorted(self.records, reverse=True):
            rec = self.records[v]
            usage = rec.model.usage if rec.model is not None else None
            label = str(v)
            out.append(
                {
                    "version": v,
                    "state": rec.state,
                    "since": rec.since,
                    "requests": int(
                        sum(self.metrics.value("aq_version_requests_total", version=label, outcome=o) for o in OUTCOMES)
                    ),
                    "in_flight": usage.in_flight + usage.mirrors if usage else 0,
                    "detail": rec.detail,
                }
            )
        return out
