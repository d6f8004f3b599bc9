"""The dataplane: what every front shares, whatever the transport (KServe's protocol/dataplane.py).

  front (parse, encode)  ──►  DataPlane.serve(started, work, refuse)   accounting + errors
                                 work: parse → DataPlane.classify → encode
                              DataPlane.classify(x, options, started)    the service, metrics
                              DataPlane.resolve_model / model_ready ...  the v2 protocol's model names

The v1 REST front (fronts/v1_rest.py), the v2 REST front (fronts/v2_rest.py) and the v2 gRPC
front (fronts/v2_grpc.py) each parse their request and encode their answer; the rest is here:
the in-flight gauge and `service.in_flight`, the outcome counter, the request time, the routed
samples and budget counters, and one error table (errors.py) for every refusal.

`serve` never raises for a request's own problems: an InputError is its 4xx, ServiceUnavailable
503 + Retry-After, a bug 500 (logged), each in the front's own shape (`refuse`), so the service
keeps serving; only cancellation (the shutdown's drain timeout) propagates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from adaptive_quant.core.precision import Precision
from adaptive_quant.serving.errors import ModelNotFound, Refusal, refusal
from adaptive_quant.serving.service_api import ServiceAPI
from adaptive_quant.serving.v2_codec import VERSION

if TYPE_CHECKING:
    from adaptive_quant.core.manifest import Manifest
    from adaptive_quant.serving.metrics import GatewayMetrics
    from adaptive_quant.serving.options import ClassifyOptions
    from adaptive_quant.serving.service import ClassifyResult
    from adaptive_quant.serving.settings import ServeSettings

T = TypeVar("T")  # what a front answers with: (status, headers, body) over HTTP, a message over gRPC


def precision_header(precisions: set[str]) -> str:
    """The one precision that served a request, or the comma-joined set, most precise first
    (X-Precision, the v1 body's precision, the v2 response parameter)."""
    return ",".join(sorted(precisions, key=lambda p: -Precision(p).rank))


class DataPlane:
    """One service's dataplane; every front of one gateway process holds the same one."""

    __slots__ = ("service", "settings")

    def __init__(self, service: ServiceAPI) -> None:
        self.service = service
        self.settings: ServeSettings = service.settings

    @property
    def manifest(self) -> Manifest:
        return self.service.manifest

    @property
    def metrics(self) -> GatewayMetrics:
        return self.service.metrics

    async def serve(self, started: float, work: Callable[[], Awaitable[T]], refuse: Callable[[Refusal], T]) -> T:
        """Run one request's `work` (parse → classify → encode) with the accounting every front
        shares, and answer its failures through `refuse` (the front's error shape) from the one
        error table. `started`: perf_counter() s at the request's arrival."""
        service = self.service
        m = service.metrics
        m.in_flight.inc()
        service.in_flight += 1
        outcome = "error"
        try:
            answer = await work()
            outcome = "ok"
            return answer
        except asyncio.CancelledError:  # the shutdown's drain timeout cut it
            outcome = "cancelled"
            raise
        except Exception as exc:
            r = refusal(exc)
            outcome = r.kind.outcome
            return refuse(r)
        finally:
            m.in_flight.dec()
            service.in_flight -= 1
            m.requests.labels(outcome).inc()
            m.request_time.observe(time.perf_counter() - started)

    async def classify(self, x: np.ndarray, options: ClassifyOptions, started: float) -> ClassifyResult:
        """x (N, 3, H, W) float32 → the routed answer, the routed samples and the budget counted.
        The service checks the options against the model version that serves the request
        (`check_options`: a floor or a pinned variant it does not offer is a 422)."""
        result = await self.service.classify(x, options, started)
        self.record_result(result, options.budget_ms)
        return result

    def record_result(self, result: ClassifyResult, budget_ms: float | None) -> None:
        """The per-sample and budget counters of one answered request."""
        m = self.service.metrics
        variants = result.variants
        for key in set(variants):
            m.samples_routed.labels(key).inc(variants.count(key))
        if budget_ms is not None:
            m.budget.labels("met" if result.budget_met else "missed").inc()

    # -------------------------------------------------------------- the v2 protocol's models by name

    def resolve_model(self, name: str, version: str | None) -> str | None:
        """The model a caller names → None (the logical model, routed) or the pinned variant key.
        An unknown name or version is a 404 that lists what exists."""
        if version not in (None, "", VERSION):
            raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: {VERSION}")
        service = self.service
        manifest = service.manifest
        if name == manifest.model_name:
            return None
        for key in service.keys:
            if manifest.variants[key].triton_name == name:
                return key
        raise ModelNotFound(f"unknown model {name!r}; models: {', '.join(self.model_names())}")

    def model_names(self) -> list[str]:
        """The logical model first, then each served variant by its Triton name."""
        manifest = self.service.manifest
        return [manifest.model_name, *(manifest.variants[k].triton_name for k in self.service.keys)]

    def ready(self) -> bool:
        return self.service.ready()

    def model_ready(self, variant: str | None) -> bool:
        """The logical model: any variant can serve; a pinned variant: it is routable."""
        if variant is None:
            return self.service.ready()
        return bool(self.service.routable()[self.service.keys.index(variant)])
