"""The Open Inference Protocol (KServe v2) over HTTP/REST: Triton's clients call the gateway as
if it were Triton.

  GET  /v2/health/live, /v2/health/ready           probes (open without an API key)
  GET  /v2                                          server metadata
  GET  /v2/models/{model}[/versions/1]              model metadata
  GET  /v2/models/{model}[/versions/1]/ready        200 ready, 503 not (yet)
  GET  /v2/models/{model}[/versions/1]/config       Triton-style model configuration
  POST /v2/models/{model}[/versions/1]/infer        inference (JSON, or the binary tensor extension)

`{model}` is the logical model (the manifest's model_name, e.g. cifar_resnet): every sample is
routed, two-stage, exactly as on /v1/classify, by the same dataplane and service. A variant's
Triton name (cifar_resnet_int8) pins that variant: it alone answers, no follow-up, no fallback,
as Triton would. The codec is v2_codec.py; infer is a fast route (fronts/asgi.py).

Every error has the protocol's shape, {"error": "<message>"}, which tritonclient raises as
InferenceServerException with that message (the error table, errors.py, for every /v2 path).
"""

from __future__ import annotations

import gzip
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from adaptive_quant.serving.dataplane import DataPlane, Ticket, precision_header
from adaptive_quant.serving.errors import STARTING_MESSAGE, PayloadTooLarge, ProtocolError, Refusal, ServiceUnavailable
from adaptive_quant.serving.fronts.asgi import (
    JSON,
    STARTING,
    Answer,
    FastRoute,
    GatewayApp,
    ReadBody,
    answer_headers,
    body_reader,
    request_headers,
    send_answer,
)
from adaptive_quant.serving.v2_codec import (
    PLATFORM,
    SERVER_NAME,
    SERVER_VERSION,
    encode_infer_response,
    model_config,
    model_metadata,
    output_tensors,
    parse_infer_request,
    response_parameters,
    routing_options,
)

TAG = "Open Inference Protocol (KServe v2)"
BINARY = (b"content-type", b"application/octet-stream")
EXTENSIONS = ["binary_tensor_data", "classification", "parameters"]
ENCODINGS = ("gzip", "deflate")


def v2_error(r: Refusal) -> Answer:
    return r.http_answer(v2=True)


# ------------------------------------------------------------------------------- POST .../infer


async def infer(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI app of POST /v2/models/{model}[/versions/{version}]/infer."""
    started = time.perf_counter()
    plane: DataPlane | None = scope["app"].state.dataplane
    if plane is None:
        await send_answer(send, v2_error(STARTING))
        return
    params = scope["path_params"]
    headers = request_headers(scope)
    read_body = body_reader(scope, receive)

    async def work(ticket: Ticket) -> Answer:
        return await infer_request(plane, ticket, params["model"], params.get("version"), headers, read_body, started)

    await send_answer(send, await plane.serve(started, work, v2_error))


async def infer_request(
    plane: DataPlane,
    ticket: Ticket,
    name: str,
    version: str | None,
    headers: Mapping[str, str],
    read_body: ReadBody,
    started: float,
) -> Answer:
    """One v2 infer request, served by the ticket's model version: the model named, the body
    (inflated, parsed), the options, the dataplane's answer, encoded. `headers` maps lower-case
    names to values."""
    variant = plane.resolve_model(name, version, ticket)
    settings = plane.settings
    limit = settings.limits.max_tensor_request_bytes
    body = _decompress(await read_body(limit), headers.get("content-encoding"), limit)
    request = parse_infer_request(
        body, headers.get("inference-header-content-length"), ticket.model.manifest, settings.limits.max_instances
    )
    options, ignored = routing_options(request.parameters, headers, settings.routing.default_priority, variant)
    result = await plane.classify(request.x, options, started, ticket)
    precision = precision_header(set(result.precisions))
    params = response_parameters(result, precision, options.budget_ms, ignored)
    body, header_length = encode_infer_response(
        name,
        request,
        output_tensors(result.probs, result.passes, result.precisions),
        result.probs,
        result.classes,
        params,
        str(result.version),
    )
    out = [BINARY if header_length is not None else JSON]
    if header_length is not None:
        out.append((b"inference-header-content-length", str(header_length).encode()))
    enc = _accepted_encoding(headers)
    if enc is not None:
        body = gzip.compress(body, 1) if enc == "gzip" else zlib.compress(body, 1)
        out.append((b"content-encoding", enc.encode()))
    return 200, out + answer_headers(precision, result.budget_met, started, result.version), body


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


# ------------------------------------------------------------------------------- the other routes
# (they raise the domain's errors; the exception handlers answer them in the protocol's shape)

router = APIRouter(tags=[TAG])
_V2_ERROR = {"description": 'the protocol\'s error: {"error": "<message>"}'}


async def get_plane(request: Request) -> DataPlane:
    plane = request.app.state.dataplane
    if plane is None:  # the lifespan has not finished starting the backend
        raise ServiceUnavailable(STARTING_MESSAGE, retry_after_s=1)
    return plane


PlaneDep = Annotated[DataPlane, Depends(get_plane)]


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/v2/health/live", summary="v2: the server is alive")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready", summary="v2: ready (a variant can serve)", responses={503: _V2_ERROR})
async def ready(plane: PlaneDep) -> Response:
    if not plane.ready():
        raise ServiceUnavailable("no variant can serve", retry_after_s=None)
    return Response(status_code=200)


@router.get("/v2", summary="v2: server metadata")
async def server_metadata() -> Response:
    return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})


def _metadata(plane: DataPlane, model: str, version: str | None) -> Response:
    plane.resolve_model(model, version)
    return _json(model_metadata(plane.manifest, model, PLATFORM, plane.versions()))


def _ready(plane: DataPlane, model: str, version: str | None) -> Response:
    if not plane.model_ready(plane.resolve_model(model, version)):
        raise ServiceUnavailable(f"model {model} is not ready", retry_after_s=None)
    return Response(status_code=200)


def _config(plane: DataPlane, model: str, version: str | None) -> Response:
    variant = plane.resolve_model(model, version)
    return _json(model_config(plane.manifest, model, plane.settings.limits.max_instances, variant))


PerModel = Callable[[DataPlane, str, "str | None"], Response]  # plane, model, version (None: latest)


def _per_model(suffix: str, handler: PerModel, summary: str) -> None:
    """GET `handler` at /v2/models/{model}<suffix> and .../versions/{version}<suffix>, as Triton serves them."""

    async def latest(plane: PlaneDep, model: str) -> Response:
        return handler(plane, model, None)

    async def versioned(plane: PlaneDep, model: str, version: str) -> Response:
        return handler(plane, model, version)

    name = handler.__name__.lstrip("_")
    for path, endpoint, tail in (("", latest, "latest"), ("/versions/{version}", versioned, "version")):
        router.add_api_route(
            f"/v2/models/{{model}}{path}{suffix}",
            endpoint,
            methods=["GET"],
            summary=summary,
            name=f"v2_{name}_{tail}",
            responses={404: _V2_ERROR, 503: _V2_ERROR},
        )


_per_model("", _metadata, "v2: model metadata")
_per_model("/ready", _ready, "v2: model ready")
_per_model("/config", _config, "v2: model configuration")

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


def infer_routes() -> list[FastRoute]:
    """POST .../infer with and without /versions/{version}, declared for the OpenAPI document
    and answered by `infer`."""
    return [
        FastRoute(
            f"/v2/models/{{model}}{path}/infer",
            infer,
            name=f"v2_infer_{tail}",
            tags=[TAG],
            summary="v2: inference, routed per sample (parameters latency_budget_ms, priority, min_precision)",
            responses=_INFER_ERRORS,
            openapi_extra=_INFER_BODY,
        )
        for path, tail in (("", "latest"), ("/versions/{version}", "version"))
    ]


async def unsupported(rest: str) -> Response:
    """The protocol's other endpoints (repository, statistics, shared memory, trace, logging)
    get a 404 in the protocol's shape, so tritonclient raises a readable error."""
    raise ProtocolError(
        f"/v2/{rest} is not served here; served: health/live, health/ready, server metadata (/v2), and per model "
        "metadata, ready, config and infer",
        status=404,
    )


def install(app: GatewayApp) -> None:
    """The v2 REST front's routes on `app`; the catch-all last."""
    app.include_router(router)
    for route in infer_routes():
        app.add_fast_route(route)
    app.add_api_route("/v2/{rest:path}", unsupported, methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False)
