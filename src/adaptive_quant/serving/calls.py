"""One backend call of one variant, with its accounting: the latency estimate, the in-flight
gauge, the backend latency histogram and the variant's breaker.

The entry pass (entry.py) and the follow-up passes (followup.py) both call variants through
here; each decides what a failure means (a fallback, or the entry answer standing).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import numpy as np

from adaptive_quant.serving.metrics import GatewayMetrics

if TYPE_CHECKING:
    from adaptive_quant.serving.model import ServedModel


class VariantCalls:
    """Calls a variant of a model version on that version's own backend (`model.backend`)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    async def infer(self, model: ServedModel, key: str, x: np.ndarray, timeout_ms: float) -> np.ndarray:
        """Logits (n, C) of variant `key` of `model` for x (n, 3, H, W), cut after `timeout_ms`
        (TimeoutError). The latency estimate learns from a success or a timeout (at least this
        slow), not from an error or a cancellation (the client went away); only errors count
        towards the variant's breaker."""
        n = x.shape[0]
        if timeout_ms <= 0:
            raise TimeoutError("no budget left for the follow-up")
        estimator = model.estimator
        predicted = estimator.begin(key, n)
        gauge = self.metrics.variant_in_flight.labels(key)
        gauge.inc(n)
        t = time.perf_counter()
        observed: float | None = None
        try:
            # asyncio.timeout, not wait_for: no extra task and loop turn per call, and an inline
            # batch (batcher.py) then completes without leaving this task
            async with asyncio.timeout(timeout_ms / 1e3):
                logits = await model.backend.infer(key, x)
            if logits.shape != (n, model.num_classes):
                raise ValueError(f"backend returned logits of shape {logits.shape} for {n} samples")
            observed = (time.perf_counter() - t) * 1e3
            self.metrics.backend_latency.labels(key).observe(observed / 1e3)
            model.breakers.record_success(key)
            return logits
        except TimeoutError:
            observed = (time.perf_counter() - t) * 1e3  # at least this slow: a latency observation
            raise
        except Exception:
            model.breakers.record_failure(key)
            raise
        finally:
            gauge.dec(n)
            estimator.end(key, n, observed, predicted)
