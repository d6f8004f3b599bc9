"""Mirrors: the canary run on a sample of the serving version's requests, to measure agreement.

After a request served by the serving version has its entry answer, with probability
`mirror_share` (and while fewer than rollout.mirror_max_in_flight mirrors run in this worker)
the canary's same variant runs on the same input in a background task; the top-1 of both
versions' entry logits are compared per sample and counted in aq_mirror_comparisons_total
{version=<canary>, result=agree|disagree|failed}. A mirror beyond the limit is skipped, never
queued, and nothing of it reaches the caller: the answer never waits for it. It is the only
signal that catches a network that runs fine and answers wrongly (a permuted class).

The mirrored call goes through `VariantCalls`, like the canary's own requests: its latency
estimate sees the extra load, and a failing canary variant meets its breaker.
"""

from __future__ import annotations

import asyncio
import logging
import random

import numpy as np

from adaptive_quant.serving.calls import VariantCalls
from adaptive_quant.serving.metrics import GatewayMetrics
from adaptive_quant.serving.model import ServedModel
from adaptive_quant.serving.versions import VersionSet

log = logging.getLogger(__name__)


class Mirrors:
    """The mirrored calls of one worker."""

    def __init__(self, metrics: GatewayMetrics, calls: VariantCalls, max_in_flight: int, timeout_ms: float) -> None:
        self.metrics = metrics
        self.calls = calls
        self.max_in_flight = max_in_flight
        self.timeout_ms = timeout_ms  # ms a mirrored call may take (deadline.no_budget_timeout_ms)
        self.in_flight = 0
        self._tasks: set[asyncio.Task] = set()  # strong references until each ends

    def maybe_mirror(
        self, versions: VersionSet, model: ServedModel, x: np.ndarray, logits: np.ndarray, answered_by: np.ndarray
    ) -> None:
        """After the entry pass of a request served by `model`: mirror it onto the canary, or not.
        x (N, 3, H, W), logits (N, C) the entry logits, answered_by (N,) their variant columns."""
        canary = versions.canary
        if (
            canary is None
            or model is not versions.serving
            or versions.mirror_share <= 0
            or self.in_flight >= self.max_in_flight
            or random.random() >= versions.mirror_share
        ):
            return
        j = int(answered_by[0])  # the variant that answered the first sample; its samples are compared
        if j < 0:
            return
        key = model.keys[j]
        if key not in canary.precision_of:  # the canary does not serve this variant: nothing to compare
            return
        idx = np.flatnonzero(answered_by == j)
        expected = logits[idx].argmax(axis=1)  # (n,) the serving version's top-1
        self.in_flight += 1
        canary.usage.mirrors += 1  # counted now: the canary is not unloaded under this mirror
        task = asyncio.create_task(self._run(canary, key, x[idx], expected), name=f"mirror-v{canary.version}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, canary: ServedModel, key: str, x: np.ndarray, expected: np.ndarray) -> None:
        counter = self.metrics.mirror_comparisons
        try:
            logits = await self.calls.infer(canary, key, x, self.timeout_ms)
            if not np.isfinite(logits).all():
                raise ValueError("non-finite logits")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the canary failed where the serving version answered
            log.debug("mirror of %d sample(s) onto version %d (%s) failed: %s", len(x), canary.version, key, exc)
            counter.labels(canary.label, "failed").inc(len(x))
        else:
            agree = int((logits.argmax(axis=1) == expected).sum())
            if agree:
                counter.labels(canary.label, "agree").inc(agree)
            if agree < len(x):
                counter.labels(canary.label, "disagree").inc(len(x) - agree)
        finally:
            self.in_flight -= 1
            canary.usage.mirrors -= 1

    async def close(self) -> None:
        """Cancel the mirrors still running (shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
