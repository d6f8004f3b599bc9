"""The dataplane: what every front shares, whatever the transport (KServe's protocol/dataplane.py).

  front (parse, encode)  ──►  DataPlane.serve(started, work, refuse)   version, accounting + errors
                                 work(ticket): parse → DataPlane.classify → encode
                              DataPlane.classify(x, options, started, ticket)  the service, metrics
                              DataPlane.resolve_model / model_ready ...  the v2 protocol's model names

The v1 REST front (fronts/v1_rest.py), the v2 REST front (fronts/v2_rest.py) and the v2 gRPC
front (fronts/v2_grpc.py) each parse their request and encode their answer; the rest is here:
the in-flight gauge and `service.in_flight`, the outcome counter, the request time, the routed
samples and budget counters, and one error table (errors.py) for every refusal.

`serve` picks the request's model version first (the serving one, or the canary with its
share: `Ticket`), so that parsing, routing and the answer are all that version's; a v2 request
naming a live version pins it (`Ticket.pin`). The version is counted in flight on it until the
answer is made (a version is unloaded only when none is), and every answer made after it was
picked carries it (X-Model-Version; the v2 answers' model_version), refusals included.

`serve` never raises for a request's own problems: an InputError is its 4xx, ServiceUnavailable
503 + Retry-After, a bug 500 (logged), each in the front's own shape (`refuse`), so the service
keeps serving; only cancellation (the shutdown's drain timeout) propagates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from adaptive_quant.core.precision import Precision
from adaptive_quant.serving.errors import ModelNotFound, Refusal, refusal
from adaptive_quant.serving.service_api import ServiceAPI

if TYPE_CHECKING:
    from adaptive_quant.core.manifest import Manifest
    from adaptive_quant.serving.metrics import GatewayMetrics
    from adaptive_quant.serving.model import ServedModel
    from adaptive_quant.serving.options import ClassifyOptions
    from adaptive_quant.serving.service import ClassifyResult
    from adaptive_quant.serving.settings import ServeSettings

T = TypeVar("T")  # what a front answers with: (status, headers, body) over HTTP, a message over gRPC


def precision_header(precisions: set[str]) -> str:
    """The one precision that served a request, or the comma-joined set, most precise first
    (X-Precision, the v1 body's precision, the v2 response parameter)."""
    return ",".join(sorted(precisions, key=lambda p: -Precision(p).rank))


class Ticket:
    """One request's model version, picked once when it arrives."""

    __slots__ = ("model",)

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        model.usage.in_flight += 1

    def pin(self, model: ServedModel) -> None:
        """Serve this request with `model` instead (a v2 request that names a version)."""
        if model is not self.model:
            self.model.usage.in_flight -= 1
            model.usage.in_flight += 1
            self.model = model

    def done(self) -> None:
        self.model.usage.in_flight -= 1


def version_header(model: ServedModel) -> tuple[bytes, bytes]:
    return (b"x-model-version", model.label.encode())


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

    async def serve(self, started: float, work: Callable[[Ticket], Awaitable[T]], refuse: Callable[[Refusal], T]) -> T:
        """Run one request's `work` (parse → classify → encode, on the version its ticket holds)
        with the accounting every front shares, and answer its failures through `refuse` (the
        front's error shape, with X-Model-Version) from the one error table. `started`:
        perf_counter() s at the request's arrival."""
        service = self.service
        m = service.metrics
        m.in_flight.inc()
        service.in_flight += 1
        ticket = Ticket(service.pick())
        outcome = "error"
        try:
            answer = await work(ticket)
            outcome = "ok"
            return answer
        except asyncio.CancelledError:  # the shutdown's drain timeout cut it
            outcome = "cancelled"
            raise
        except Exception as exc:
            r = refusal(exc)
            outcome = r.kind.outcome
            return refuse(dataclasses.replace(r, headers=(*r.headers, version_header(ticket.model))))
        finally:
            ticket.done()
            m.in_flight.dec()
            service.in_flight -= 1
            m.requests.labels(outcome).inc()
            m.version_requests.labels(ticket.model.label, outcome).inc()
            m.request_time.observe(time.perf_counter() - started)

    async def classify(
        self, x: np.ndarray, options: ClassifyOptions, started: float, ticket: Ticket | None = None
    ) -> ClassifyResult:
        """x (N, 3, H, W) float32 → the routed answer, the routed samples and the budget counted,
        by the ticket's version (None: the service picks). The service checks the options
        against that version (`check_options`: a floor or a pinned variant it does not offer is a 422)."""
        result = await self.service.classify(x, options, started, None if ticket is None else ticket.model)
        self.record_result(result, options.budget_ms)
        return result

    def record_result(self, result: ClassifyResult, budget_ms: float | None) -> None:
        """The per-sample and budget counters of one answered request."""
        m = self.service.metrics
        variants = result.variants
        for key in set(variants):
            m.samples_routed.labels(key).inc(variants.count(key))
        if budget_ms is not None:
            met = "met" if result.budget_met else "missed"
            m.budget.labels(met).inc()
            m.version_budget.labels(str(result.version), met).inc()

    # -------------------------------------------------------------- the v2 protocol's models by name

    def versions(self) -> list[str]:
        """The live model versions, serving first (the v2 protocol's model versions)."""
        return [m.label for m in self.service.versions.live()]

    def resolve_model(self, name: str, version: str | None, ticket: Ticket | None = None) -> str | None:
        """The model a caller names → None (the logical model, routed) or the pinned variant key.
        A version names a live model version: the request's `ticket` is pinned to it (without a
        ticket, the serving version answers for the others). An unknown name or version is a 404
        that lists what exists."""
        model = self.service.model if ticket is None else ticket.model
        if version not in (None, ""):
            live = self.service.versions
            named = live.find(int(version)) if version.isdigit() else None
            if named is None:
                raise ModelNotFound(
                    f"model {name!r} has no version {version!r}; versions: {', '.join(self.versions())}"
                )
            if ticket is not None:
                ticket.pin(named)
                model = named
        manifest = model.manifest
        if name == manifest.model_name:
            return None
        for key in model.keys:
            if manifest.variants[key].triton_name == name:
                return key
        raise ModelNotFound(f"unknown model {name!r}; models: {', '.join(self.model_names(model))}")

    def model_names(self, model: ServedModel | None = None) -> list[str]:
        """The logical model first, then each served variant by its Triton name (of `model`,
        default the serving version)."""
        model = model or self.service.model
        manifest = model.manifest
        return [manifest.model_name, *(manifest.variants[k].triton_name for k in model.keys)]

    def ready(self) -> bool:
        return self.service.ready()

    def model_ready(self, variant: str | None) -> bool:
        """The logical model: any variant can serve; a pinned variant: it is routable."""
        if variant is None:
            return self.service.ready()
        return bool(self.service.routable()[self.service.keys.index(variant)])
