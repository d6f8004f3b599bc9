"""The Open Inference Protocol (KServe v2) over HTTP/REST: Triton's clients call the gateway
as if it were Triton.

  GET  /v2/health/live, /v2/health/ready           probes (open without an API key)
  GET  /v2                                          server metadata
  GET  /v2/models/{model}[/versions/1]              model metadata
  GET  /v2/models/{model}[/versions/1]/ready        200 ready, 503 not (yet)
  GET  /v2/models/{model}[/versions/1]/config       Triton-style model configuration
  POST /v2/models/{model}[/versions/1]/infer        inference (JSON, or the binary tensor extension)

`{model}` is the logical model (the manifest's model_name, e.g. cifar_resnet): every sample is
routed, two-stage, exactly as on /v1/classify, the same ClassifierService, planner and
deadlines behind both fronts. A variant's Triton name (cifar_resnet_int8) pins that variant:
it alone answers, no follow-up, no fallback, as Triton would. The codec is oip.py.

Infer takes the same raw-ASGI path as /v1/classify (GatewayApp, see hot_path.py for why); the
FastAPI routes here answer everything else, and infer whenever the fast path is bypassed.
Every error has the protocol's shape, {"error": "<message>"}, which tritonclient raises as
InferenceServerException with that message.
"""

from __future__ import annotations

import gzip
import re
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from adaptive_quant.serving.errors import InputError, PayloadTooLarge
from adaptive_quant.serving.hot_path import (
    Answer,
    ReadBody,
    answer_headers,
    asgi_body_reader,
    guarded,
    precision_header,
    record_result,
)
from adaptive_quant.serving.oip import (
    PLATFORM,
    SERVER_NAME,
    SERVER_VERSION,
    ProtocolError,
    encode_infer_response,
    error_json,
    model_config,
    model_metadata,
    model_names,  # noqa: F401 - part of this front's API, kept importable from here
    model_ready,
    output_tensors,
    parse_infer_request,
    resolve_model,
    response_parameters,
    routing_options,
)

# /v2/models/{model}/infer or /v2/models/{model}/versions/{version}/infer (the ASGI path is
# already percent-decoded; a model name holds no slash)
INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]*))?/infer$")
JSON = (b"content-type", b"application/json")
BINARY = (b"content-type", b"application/octet-stream")
EXTENSIONS = ["binary_tensor_data", "classification", "parameters"]
ENCODINGS = ("gzip", "deflate")


def v2_error(status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> Answer:
    return status, [JSON, *(headers or [])], error_json(message)


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A gzip or deflate (zlib) request body, inflated to at most `limit` bytes (no zip bombs)."""
    if encoding is None or encoding in ("", "identity"):
        return body
    if encoding not in ENCODINGS:
        raise ProtocolError(f"Content-Encoding {encoding!r} is not supported; accepted: gzip, deflate, identity")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"the body is not valid {encoding} data ({exc})") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"the request inflates past {limit} bytes, the most accepted")
    return out


def _accepted_encoding(headers: Mapping[str, str]) -> str | None:
    accept = headers.get("accept-encoding", "")
    for enc in (e.split(";")[0].strip() for e in accept.split(",")):
        if enc in ENCODINGS:
            return enc
    return None


async def infer_request(
    service: Any, name: str, version: str | None, headers: Mapping[str, str], read_body: ReadBody, started: float
) -> Answer:
    """One v2 infer request, end to end; `headers` maps lower-case names to values."""

    async def work() -> Answer:
        variant = resolve_model(service, name, version)
        limit = service.settings.limits.max_tensor_request_bytes
        body = _decompress(await read_body(limit), headers.get("content-encoding"), limit)
        request = parse_infer_request(
            body,
            headers.get("inference-header-content-length"),
            service.manifest,
            service.settings.limits.max_instances,
        )
        options, ignored = routing_options(
            request.parameters, headers, service.settings.routing.default_priority, variant
        )
        result = await service.classify(request.x, options, started)
        record_result(service, result, options.budget_ms)
        precision = precision_header(set(result.precisions))
        params = response_parameters(result, precision, options.budget_ms, ignored)
        body, header_length = encode_infer_response(
            name,
            request,
            output_tensors(result.probs, result.passes, result.precisions),
            result.probs,
            service.manifest.classes,
            params,
        )
        out = [BINARY if header_length is not None else JSON]
        if header_length is not None:
            out.append((b"inference-header-content-length", str(header_length).encode()))
        enc = _accepted_encoding(headers)
        if enc is not None:
            body = gzip.compress(body, 1) if enc == "gzip" else zlib.compress(body, 1)
            out.append((b"content-encoding", enc.encode()))
        return 200, out + answer_headers(precision, result.budget_met, started), body

    return await guarded(service, started, work, v2_error)


async def serve_infer(service: Any, scope: Mapping[str, Any], receive: Any, send: Any, match: re.Match) -> None:
    """The ASGI application for POST .../infer (GatewayApp routes it here)."""
    started = time.perf_counter()
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    status, out_headers, body = await infer_request(
        service, match.group(1), match.group(2), headers, asgi_body_reader(scope, receive), started
    )
    out_headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": out_headers})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------- FastAPI routes

router = APIRouter(tags=["Open Inference Protocol (KServe v2)"])
_V2_ERROR = {"description": 'the protocol\'s error: {"error": "<message>"}'}


def _answer(answer: Answer) -> Response:
    status, headers, body = answer
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _service_or_error(request: Request) -> tuple[Any, Response | None]:
    service = getattr(request.app.state, "service", None)
    if service is None:
        return None, _answer(v2_error(503, "the service is starting", [(b"retry-after", b"1")]))
    return service, None


def _model_or_error(request: Request, model: str, version: str | None) -> tuple[Any, str | None, Response | None]:
    service, err = _service_or_error(request)
    if err is not None:
        return None, None, err
    try:
        return service, resolve_model(service, model, version), None
    except InputError as exc:
        return None, None, _answer(v2_error(exc.status, exc.message))


@router.get("/v2/health/live", summary="v2: the server is alive")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready", summary="v2: ready (a variant can serve)", responses={503: _V2_ERROR})
async def ready(request: Request) -> Response:
    service, err = _service_or_error(request)
    if err is not None:
        return err
    if not service.ready():
        return _answer(v2_error(503, "no variant can serve"))
    return Response(status_code=200)


@router.get("/v2", summary="v2: server metadata")
async def server_metadata() -> Response:
    return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})


async def _metadata(request: Request, model: str, version: str | None) -> Response:
    service, _, err = _model_or_error(request, model, version)
    return err or _json(model_metadata(service.manifest, model, PLATFORM))


async def _ready(request: Request, model: str, version: str | None) -> Response:
    service, variant, err = _model_or_error(request, model, version)
    if err is not None:
        return err
    if not model_ready(service, variant):
        return _answer(v2_error(503, f"model {model} is not ready"))
    return Response(status_code=200)


async def _config(request: Request, model: str, version: str | None) -> Response:
    service, variant, err = _model_or_error(request, model, version)
    if err is not None:
        return err
    return _json(model_config(service.manifest, model, service.settings.limits.max_instances, variant))


async def _infer(request: Request, model: str, version: str | None) -> Response:
    service, err = _service_or_error(request)
    if err is not None:
        return err
    headers = {k.lower(): v for k, v in request.headers.items()}
    return _answer(
        await infer_request(
            service, model, version, headers, asgi_body_reader(request.scope, request.receive), time.perf_counter()
        )
    )


# each operation with and without /versions/{version}, as Triton serves them
_ERRORS: dict[int | str, dict[str, Any]] = {404: _V2_ERROR, 503: _V2_ERROR}
_INFER_ERRORS: dict[int | str, dict[str, Any]] = {400: _V2_ERROR, 404: _V2_ERROR, 413: _V2_ERROR, 503: _V2_ERROR}
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "latency_budget_ms": {"type": "number", "exclusiveMinimum": 0},
                                "priority": {"type": "string", "enum": ["quality", "balanced", "speed"]},
                                "min_precision": {"type": "string", "enum": ["int8", "fp16", "fp32"]},
                            },
                        },
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string", "enum": ["images", "pixels"]},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string", "enum": ["FP32", "UINT8"]},
                                    "data": {"type": "array"},
                                },
                            },
                        },
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            }
        },
    }
}


Handler = Callable[[Request, str, "str | None"], Awaitable[Response]]  # request, model, version (None: latest)


def _per_model(method: str, suffix: str, handler: Handler, summary: str, **kw: Any) -> None:
    """Serve `handler` at /v2/models/{model}<suffix> and .../versions/{version}<suffix>, as Triton does."""

    async def latest(request: Request, model: str) -> Response:
        return await handler(request, model, None)

    async def versioned(request: Request, model: str, version: str) -> Response:
        return await handler(request, model, version)

    name = handler.__name__.lstrip("_")
    for path, endpoint, tail in (("", latest, "latest"), ("/versions/{version}", versioned, "version")):
        router.add_api_route(
            f"/v2/models/{{model}}{path}{suffix}",
            endpoint,
            methods=[method],
            summary=summary,
            name=f"v2_{name}_{tail}",
            **kw,
        )


_per_model("GET", "", _metadata, "v2: model metadata", responses=_ERRORS)
_per_model("GET", "/ready", _ready, "v2: model ready", responses=_ERRORS)
_per_model("GET", "/config", _config, "v2: model configuration", responses=_ERRORS)
_per_model(
    "POST",
    "/infer",
    _infer,
    "v2: inference, routed per sample (parameters latency_budget_ms, priority, min_precision)",
    responses=_INFER_ERRORS,
    openapi_extra=_INFER_BODY,
)


@router.api_route(
    "/v2/{rest:path}",
    methods=["GET", "POST", "PUT", "DELETE"],
    include_in_schema=False,
)
async def unsupported(rest: str) -> Response:
    """The protocol's other endpoints (repository, statistics, shared memory, trace, logging)
    get a 404 in the protocol's shape, so tritonclient raises a readable error."""
    return _answer(
        v2_error(
            404,
            f"/v2/{rest} is not served here; served: health/live, health/ready, server metadata (/v2), and per model "
            "metadata, ready, config and infer",
        )
    )
