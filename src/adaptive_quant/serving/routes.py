"""HTTP endpoints. Thin: parse → ClassifierService → shape the answer; errors go to app.py's handlers."""

from __future__ import annotations

import time
from typing import Annotated

import psutil
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from adaptive_quant.serving.errors import ServiceUnavailable
from adaptive_quant.serving.hot_path import asgi_body_reader, classify_request
from adaptive_quant.serving.metrics import OUTCOMES
from adaptive_quant.serving.schemas import ClassifyResponse, ErrorResponse, ModelsResponse, StatusResponse
from adaptive_quant.serving.service import ClassifierService

router = APIRouter()


async def get_service(request: Request) -> ClassifierService:  # async: no threadpool hop per request
    service = getattr(request.app.state, "service", None)
    if service is None:  # lifespan has not finished starting the backend
        raise ServiceUnavailable("the service is starting", retry_after_s=1)
    return service


ServiceDep = Annotated[ClassifierService, Depends(get_service)]

_ERRORS = {
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


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    responses=_ERRORS,  # type: ignore[arg-type]
    openapi_extra={
        "parameters": CLASSIFY_HEADERS,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ClassifyRequest"}}
            },  # app.py adds it
        },
    },
    summary="Classify images; each sample is routed to the precision that fits the latency budget",
)
async def classify(request: Request, service: ServiceDep) -> Response:
    # GatewayApp answers this route on its lean path (hot_path.py); FastAPI reaches it only when
    # that path is bypassed (an app mounted inside another, a test calling the router directly):
    # the same function, so the same behaviour
    status, headers, body = await classify_request(
        service, request.headers, asgi_body_reader(request.scope, request.receive), time.perf_counter()
    )
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


def gateway_usage(proc: psutil.Process, supervised: bool) -> dict:
    """RSS and CPU time summed over the gateway's processes: this one alone, or the supervisor
    and every process it started (workers.py) when this is one of several workers."""
    procs = [proc]
    if supervised:
        try:
            parent = proc.parent()
            procs = [parent, *parent.children()] if parent is not None else procs
        except psutil.Error:  # the supervisor went away mid-call: this worker's own figures
            procs = [proc]
    rss, cpu_s, pids = 0, 0.0, []
    for p in procs:
        try:
            with p.oneshot():
                rss += p.memory_info().rss
                t = p.cpu_times()
                cpu_s += t.user + t.system
                pids.append(p.pid)
        except psutil.Error:  # a worker restarting right now
            continue
    return {"processes": len(pids), "pids": pids, "rss_bytes": rss, "cpu_s": round(cpu_s, 4)}


@router.get(
    "/v1/status", response_model=StatusResponse, summary="Variants, health, live latency, load, memory, routing counts"
)
async def status(service: ServiceDep) -> dict:
    m = service.metrics
    health = service.backend.variants()
    routable = service.routable()
    batching = getattr(service.backend, "batch_stats", lambda: {})()
    states = getattr(service.backend, "model_states", lambda: {})()  # Triton: loaded or not, and why
    variants = []
    for j, key in enumerate(service.keys):
        entry = service.manifest.variants[key]
        variants.append(
            {
                "key": key,
                "precision": entry.precision,
                "triton_name": entry.triton_name,
                "healthy": health[key].healthy,
                "detail": health[key].detail,
                "routable": bool(routable[j]),
                "val_accuracy": entry.val_accuracy,
                "latency": service.estimator.snapshot(key),
                "routed_samples": int(m.value("aq_samples_routed_total", variant=key)),
                "failures": service.breakers[key].total_failures,
                "batching": batching.get(key),
                "loaded": states[key]["loaded"] if key in states else health[key].healthy,
                "loaded_reason": states[key]["reason"] if key in states else health[key].detail,
            }
        )
    fallbacks = {
        key: int(sum(m.value("aq_fallbacks_total", variant=key, reason=r) for r in ("error", "timeout")))
        for key in service.keys
    }
    proc = psutil.Process()
    mem, cpu = proc.memory_info(), proc.cpu_times()
    return {
        "model": service.manifest.model_name,
        "backend": service.backend.name,
        "ready": service.ready(),
        # what routes a request when no router does (none in the repository, or planner.enabled false)
        "single_stage": {
            "in_use": service.followup is None,
            "summary": service.prior.summary(),
            **service.prior.to_json(),
        },
        "router": {
            "two_stage": service.followup is not None,
            "summary": service.router_info.summary,
            "plans": [p.name for p in service.followup.plans[1:]] if service.followup else [],
            "followups_by_plan": (
                {p.name: int(m.value("aq_followups_total", plan=p.name)) for p in service.followup.plans[1:]}
                if service.followup
                else {}
            ),
            "followup_passes_lost": {
                r: int(m.value("aq_followup_passes_lost_total", reason=r)) for r in ("cut", "failed")
            },
            "detail": service.router_info.detail,
        },
        "variants": variants,
        "in_flight_requests": service.in_flight,
        "process": {
            "rss_bytes": mem.rss,
            "pid": proc.pid,
            "cpu_s": round(cpu.user + cpu.system, 4),
            # one of server.workers processes on this port: the figures here are this worker's own
            # (/metrics sums all of them)
            "worker": service.worker.index if service.worker else 0,
            "workers": service.worker.count if service.worker else 1,
        },
        # every process of this gateway together (the supervisor and all its workers): what a
        # load test's memory and CPU figures must read
        "gateway": gateway_usage(proc, service.worker is not None and service.worker.count > 1),
        "routing": {
            "samples_by_variant": {v["key"]: v["routed_samples"] for v in variants},
            "fallbacks_by_variant": fallbacks,
            "requests": {o: int(m.value("aq_requests_total", outcome=o)) for o in OUTCOMES},
            "budget_met": int(m.value("aq_budget_total", result="met")),
            "budget_missed": int(m.value("aq_budget_total", result="missed")),
        },
        "uptime_s": round(time.monotonic() - service.started_at, 3),
        "model_control": getattr(service.backend, "model_control", "none"),
        "memory": service.memory_controller.snapshot() if service.memory_controller else {"enabled": False},
        "profile": service.profile_info.to_json(),
    }


@router.get("/v1/models", response_model=ModelsResponse, summary="The model and its variants, from manifest.json")
async def models(service: ServiceDep) -> dict:
    man = service.manifest
    health = service.backend.variants()
    variants = []
    for v in man.variants.values():
        variants.append(
            {
                "key": v.key,
                "precision": v.precision,
                "triton_name": v.triton_name,
                "served": v.served,
                "healthy": health[v.key].healthy if v.key in health else False,
                "size_bytes": v.size_bytes,
                "sha256": v.sha256,
                "val_accuracy": v.val_accuracy,
                "agreement_with_fp32": v.agreement_with_fp32,
                "latency_p95_ms": {b: p.p95_ms for b, p in v.latency.batches.items()} if v.latency else None,
            }
        )
    return {
        "model": man.model_name,
        "classes": man.classes,
        "input": {
            "name": man.input_name,
            "shape": ["N", 3, man.image_size, man.image_size],
            "dtype": "float32",
            "mean": man.mean,
            "std": man.std,
        },
        "output": {"name": man.output_name, "shape": ["N", len(man.classes)], "dtype": "float32"},
        "variants": variants,
        "training": man.training,
    }


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
