"""The REST front: POST /v1/classify, and /v1/status, /v1/models, the probes and /metrics.

POST /v1/classify is a fast route (fronts/asgi.py): raw ASGI, orjson, no pydantic. It parses the
routing headers (options.py) and the JSON images (decode.py), hands the model input to the
dataplane, and encodes the answer (the contract in schemas.ClassifyResponse) with X-Precision,
X-Budget-Met, X-Server-Time-Ms and X-Model-Version (the model version that answered). Refusals are the error table's, in the /v1 shape
{"error": {"type", "message"}}.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from adaptive_quant.core.images import to_model_input
from adaptive_quant.serving.dataplane import DataPlane, Ticket, precision_header
from adaptive_quant.serving.decode import decode_instances, parse_json
from adaptive_quant.serving.errors import STARTING_MESSAGE, Refusal, ServiceUnavailable
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
from adaptive_quant.serving.options import parse_options
from adaptive_quant.serving.schemas import ClassifyResponse, ErrorResponse, ModelsResponse, StatusResponse
from adaptive_quant.serving.service_api import ServiceAPI
from adaptive_quant.serving.status import models_body, status_body

if TYPE_CHECKING:
    from adaptive_quant.serving.service import ClassifyResult

CLASSIFY_PATH = "/v1/classify"


def v1_error(r: Refusal) -> Answer:
    return r.http_answer(v2=False)


# ------------------------------------------------------------------------------- POST /v1/classify


async def classify(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI app of POST /v1/classify."""
    started = time.perf_counter()
    plane: DataPlane | None = scope["app"].state.dataplane
    if plane is None:
        await send_answer(send, v1_error(STARTING))
        return
    headers = request_headers(scope)
    read_body = body_reader(scope, receive)

    async def work(ticket: Ticket) -> Answer:
        return await classify_request(plane, headers, read_body, started, ticket)

    await send_answer(send, await plane.serve(started, work, v1_error))


async def classify_request(
    plane: DataPlane, headers: dict[str, str], read_body: ReadBody, started: float, ticket: Ticket | None = None
) -> Answer:
    """Options, body, decode, route + infer (the dataplane), the answer, by the ticket's model
    version (None: the service picks one). `headers`: lower-case names → values; `started`:
    perf_counter() s at arrival."""
    settings = plane.settings
    options = parse_options(headers, settings.routing.default_priority)
    limits = settings.limits
    body = await read_body(limits.max_request_bytes)
    manifest = plane.manifest if ticket is None else ticket.model.manifest
    images = decode_instances(parse_json(body), limits.max_instances, manifest.image_size)
    x = to_model_input(images, manifest.mean, manifest.std)  # (N, 3, H, W)
    result = await plane.classify(x, options, started, ticket)
    return encode_answer(result, options.budget_ms, started)


def encode_answer(result: ClassifyResult, budget_ms: float | None, started: float) -> Answer:
    """A ClassifyResult → the JSON answer and its headers (schemas.ClassifyResponse)."""
    probs = result.probs  # (N, C): averaged over the passes that answered each sample
    class_ids = probs.argmax(axis=1).tolist()
    confidences = probs[range(len(class_ids)), class_ids].tolist()
    classes = result.classes
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
    return 200, [JSON, *answer_headers(precision, result.budget_met, started, result.version)], out


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "body is empty or not JSON"},
    413: {"model": ErrorResponse, "description": "body or instance count over the configured limit"},
    422: {"model": ErrorResponse, "description": "bad instance or header; the message says what is accepted"},
    503: {"model": ErrorResponse, "description": "no variant could answer; see Retry-After"},
}
# documented here for clients and schema-driven fuzzers; parsed by options.py (which explains a bad value)
CLASSIFY_HEADERS = [
    {
        "name": "X-Latency-Budget-Ms",
        "in": "header",
        "required": False,
        "description": "server time the caller allows, ms; the router picks, per sample, a variant expected to fit",
        "schema": {"type": "number", "exclusiveMinimum": 0},
    },
    {
        "name": "X-Priority",
        "in": "header",
        "required": False,
        "description": "quality: the most accurate variant that fits; speed: the fastest within tolerance; "
        "balanced (default): accuracy traded against latency",
        "schema": {"type": "string", "enum": ["quality", "balanced", "speed"]},
    },
    {
        "name": "X-Min-Precision",
        "in": "header",
        "required": False,
        "description": "never answer below this precision",
        "schema": {"type": "string", "enum": ["int8", "fp16", "fp32"]},
    },
]


def classify_route() -> FastRoute:
    """POST /v1/classify, declared for the OpenAPI document and answered by `classify`."""
    return FastRoute(
        CLASSIFY_PATH,
        classify,
        name="classify",
        response_model=ClassifyResponse,
        responses=ERRORS,
        openapi_extra={
            "parameters": CLASSIFY_HEADERS,
            "requestBody": {  # request_schemas (schemas.py) adds ClassifyRequest, with this service's limits
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ClassifyRequest"}}},
            },
        },
        summary="Classify images; each sample is routed to the precision that fits the latency budget",
    )


# ------------------------------------------------------------------------------- the other routes

router = APIRouter()


async def get_service(request: Request) -> ServiceAPI:  # async: no threadpool hop per request
    service = request.app.state.service
    if service is None:  # the lifespan has not finished starting the backend
        raise ServiceUnavailable(STARTING_MESSAGE, retry_after_s=1)
    return service


ServiceDep = Annotated[ServiceAPI, Depends(get_service)]


@router.get(
    "/v1/status", response_model=StatusResponse, summary="Variants, health, live latency, load, memory, routing counts"
)
async def status(service: ServiceDep) -> dict:
    return status_body(service)


@router.get("/v1/models", response_model=ModelsResponse, summary="The model and its variants, from manifest.json")
async def models(service: ServiceDep) -> dict:
    return models_body(service)


@router.get("/healthz", summary="Alive (the process answers)")
async def healthz() -> dict:
    return {"status": "alive"}


@router.get("/readyz", summary="Ready: at least one variant can serve", responses={503: {"model": ErrorResponse}})
async def readyz(service: ServiceDep) -> JSONResponse:
    ready = service.ready()
    health = service.backend.variants()
    body = {"ready": ready, "variants": {k: health[k].healthy for k in service.keys}}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=True)
async def metrics(request: Request) -> Response:
    m = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)


def install(app: GatewayApp) -> None:
    """The REST front's routes on `app`, classify first."""
    app.add_fast_route(classify_route())
    app.include_router(router)
