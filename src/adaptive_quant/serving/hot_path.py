"""POST /v1/classify, the route every request takes, kept lean: raw ASGI, orjson, no pydantic.

Profiled with py-spy at concurrency 64 on 2 cores (Intel Xeon, 2026-12-01), the gateway's event
loop was 94 % busy, and 21 % of it went to the framework's layers around the endpoint
(FastAPI's routing, dependency solving, telemetry and body-limit middlewares, Starlette's
exception and exit-stack middlewares) before a line of ours ran. `GatewayApp` (app.py) hands
this one route to `serve_classify` straight from the ASGI server; every other path, the OpenAPI
document and the probes still go through FastAPI. Both fronts call `classify_request`, so the
behaviour (limits, errors, metrics, auth) is one implementation.

`classify_request` never raises for a request's own problems: it answers every InputError,
ServiceUnavailable and bug with the error shape of app.py ({"error": {"type", "message"}}),
so the service keeps serving; only cancellation (the drain timeout) propagates.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import orjson

from adaptive_quant.core.images import to_model_input
from adaptive_quant.core.precision import Precision
from adaptive_quant.serving.auth import presented_key
from adaptive_quant.serving.decode import decode_instances, parse_json
from adaptive_quant.serving.errors import InputError, PayloadTooLarge, ServiceUnavailable, error_body
from adaptive_quant.serving.options import parse_options

log = logging.getLogger(__name__)

CLASSIFY_PATH = "/v1/classify"
JSON = (b"content-type", b"application/json")

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body
ReadBody = Callable[[int], Awaitable[bytes]]  # limit (bytes) → the body; PayloadTooLarge beyond it


def precision_header(precisions: set[str]) -> str:
    """X-Precision: the one precision that served the request, or the comma-joined set, most precise first."""
    return ",".join(sorted(precisions, key=lambda p: -Precision(p).rank))


def error_answer(status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> Answer:
    """The REST front's error: {"error": {"type", "message"}} (errors.error_body)."""
    return status, [JSON, *(headers or [])], orjson.dumps(error_body(status, message))


ErrorAnswer = Callable[[int, str, "list[tuple[bytes, bytes]] | None"], Answer]  # status, message, headers
T = TypeVar("T")  # what a front answers with: an Answer over HTTP, a response message over gRPC


async def guarded(
    service: Any,
    started: float,
    work: Callable[[], Awaitable[T]],
    on_error: Callable[[int, str, list[tuple[bytes, bytes]] | None], T] = error_answer,  # type: ignore[assignment]
) -> T:
    """Run one request's `work` with the accounting every front shares (in-flight gauge,
    outcome counter, request time) and turn its failures into answers in the front's own error
    shape (`on_error`, given the HTTP status, the message and extra headers; gRPC maps the
    status to its code): an InputError its 4xx, ServiceUnavailable 503 + Retry-After, a bug 500.
    Never raises for a request's own problems, so the service keeps serving; only cancellation
    (the drain timeout) propagates. `started`: perf_counter() s at the request's arrival."""
    m = service.metrics
    m.in_flight.inc()
    service.in_flight += 1
    outcome = "error"
    try:
        answer = await work()
        outcome = "ok"
        return answer
    except InputError as exc:
        outcome = "client_error"
        return on_error(exc.status, exc.message, None)
    except ServiceUnavailable as exc:
        outcome = "unavailable"
        return on_error(503, exc.message, [(b"retry-after", str(exc.retry_after_s).encode())])
    except asyncio.CancelledError:  # the shutdown's drain timeout cut it
        outcome = "cancelled"
        raise
    except Exception:
        log.exception("internal error while serving a request")
        return on_error(500, "internal error; see the server log", None)
    finally:
        m.in_flight.dec()
        service.in_flight -= 1
        m.requests.labels(outcome).inc()
        m.request_time.observe(time.perf_counter() - started)


async def classify_request(service: Any, headers: Mapping[str, str], read_body: ReadBody, started: float) -> Answer:
    """One classify request, end to end: options, body, decode, route + infer, the answer.
    `headers` maps lower-case names to values; `started` is perf_counter() s at arrival."""

    async def work() -> Answer:
        options = parse_options(headers, service.settings.routing.default_priority)
        limits = service.settings.limits
        body = await read_body(limits.max_request_bytes)
        images = decode_instances(parse_json(body), limits.max_instances, service.manifest.image_size)
        x = to_model_input(images, service.manifest.mean, service.manifest.std)  # (N, 3, H, W)
        result = await service.classify(x, options, started)
        return shape_answer(service, result, options.budget_ms, started)

    return await guarded(service, started, work)


def record_result(service: Any, result: Any, budget_ms: float | None) -> None:
    """The per-sample and budget counters of one answered request (every front)."""
    m = service.metrics
    for key in set(result.variants):
        m.samples_routed.labels(key).inc(result.variants.count(key))
    if budget_ms is not None:
        m.budget.labels("met" if result.budget_met else "missed").inc()


def shape_answer(service: Any, result: Any, budget_ms: float | None, started: float) -> Answer:
    """ClassifyResult → the JSON answer and its headers (the contract in schemas.ClassifyResponse)."""
    probs = result.probs  # (N, C): averaged over the passes that answered each sample
    class_ids = probs.argmax(axis=1).tolist()
    confidences = probs[range(len(class_ids)), class_ids].tolist()
    classes = service.manifest.classes
    predictions = [
        {
            "label": classes[c],
            "class_id": c,
            "confidence": round(conf, 6),
            "precision": prec,  # the highest precision among its passes
            "variant": key,  # the entry pass's variant
            "passes": passes,  # e.g. ["int8", "int8:hflip"]
        }
        for c, conf, prec, key, passes in zip(class_ids, confidences, result.precisions, result.variants, result.passes)
    ]
    record_result(service, result, budget_ms)
    precision = precision_header(set(result.precisions))
    body = {
        "predictions": predictions,
        "precision": precision,
        "budget_ms": budget_ms,
        "budget_met": result.budget_met,
        "server_time_ms": round(result.server_time_ms, 3),
        "routing_time_ms": round(result.routing_time_ms, 4),
        "fallbacks": result.fallbacks,
        "followups": result.followups,  # samples upgraded by a follow-up pass
        "followups_lost": result.followups_lost,  # follow-up passes cut at the deadline or failed
    }
    out = orjson.dumps(body)
    return 200, [JSON, *answer_headers(precision, result.budget_met, started)], out


def answer_headers(precision: str, budget_met: bool, started: float) -> list[tuple[bytes, bytes]]:
    """X-Precision, X-Budget-Met and X-Server-Time-Ms (ms since `started`, shaping the answer
    included): every HTTP front's answer carries them."""
    server_ms = (time.perf_counter() - started) * 1e3
    return [
        (b"x-precision", precision.encode()),
        (b"x-budget-met", b"true" if budget_met else b"false"),
        (b"x-server-time-ms", f"{server_ms:.3f}".encode()),
    ]


# ---------------------------------------------------------------------------- the raw ASGI front


def key_accepted(scope: Mapping[str, Any], key: bytes | None) -> bool:
    """No key configured, or the request carries it (compared in constant time)."""
    if not key:
        return True
    given = presented_key(scope["headers"])
    return given is not None and hmac.compare_digest(given, key)


def asgi_body_reader(scope: Mapping[str, Any], receive: Callable[[], Awaitable[dict]]) -> ReadBody:
    """The body from ASGI messages, refusing more than `limit` bytes without reading it all."""

    async def read(limit: int) -> bytes:
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > limit:
                    raise PayloadTooLarge(f"request body is {int(value)} bytes; at most {limit} are accepted")
                break
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client went away; nobody reads the answer
                raise InputError("the client disconnected before sending the whole body", status=400)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # chunked upload without Content-Length
                raise PayloadTooLarge(f"request body exceeds {limit} bytes, the most accepted")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    return read


async def serve_classify(service: Any, scope: Mapping[str, Any], receive: Callable, send: Callable) -> None:
    """The ASGI application for POST /v1/classify (GatewayApp routes it here)."""
    started = time.perf_counter()
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    status, out_headers, body = await classify_request(service, headers, asgi_body_reader(scope, receive), started)
    out_headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": out_headers})
    await send({"type": "http.response.body", "body": body})
