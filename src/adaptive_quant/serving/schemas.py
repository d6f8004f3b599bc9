"""Pydantic models of the REST API's responses, and the JSON Schema of the classify request.

The request body is parsed by decode.py (for precise error messages), so it has no pydantic
model; `request_schemas` documents exactly what decode.py accepts, for clients and for
schema-driven fuzzers (tests/test_fuzz.py).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


def request_schemas(image_size: int, max_instances: int) -> dict[str, dict[str, Any]]:
    """OpenAPI components: ClassifyRequest and ClassifyInstance, with this service's limits."""
    channel = {"type": "integer", "minimum": 0, "maximum": 255}
    row = {
        "type": "array",
        "items": {"type": "array", "items": channel, "minItems": 3, "maxItems": 3},
        "minItems": image_size,
        "maxItems": image_size,
    }
    return {
        "ClassifyInstance": {
            "description": f"one {image_size}×{image_size} RGB image: exactly one of b64 or pixels",
            "oneOf": [
                {
                    "type": "object",
                    "required": ["b64"],
                    "additionalProperties": False,
                    "properties": {
                        "b64": {
                            "type": "string",
                            "contentEncoding": "base64",
                            "description": f"PNG or JPEG bytes, base64 (standard alphabet, padded); {image_size}×{image_size}",
                        }
                    },
                },
                {
                    "type": "object",
                    "required": ["pixels"],
                    "additionalProperties": False,
                    "properties": {
                        "pixels": {
                            "type": "array",
                            "items": row,
                            "minItems": image_size,
                            "maxItems": image_size,
                            "description": "height × width × RGB integers 0..255",
                        }
                    },
                },
            ],
        },
        "ClassifyRequest": {
            "type": "object",
            "required": ["instances"],
            "additionalProperties": False,
            "properties": {
                "instances": {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/ClassifyInstance"},
                    "minItems": 1,
                    "maxItems": max_instances,
                }
            },
        },
    }


class Prediction(BaseModel):
    label: str
    class_id: int
    confidence: float = Field(..., description="softmax probability of the label")
    precision: str = Field(..., description="precision of the variant that answered (fp32, fp16, int8)")
    variant: str = Field(..., description="manifest key of the variant that answered")


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]
    precision: str = Field(
        ..., description="as X-Precision: one precision, or the comma-joined set (most precise first)"
    )
    budget_ms: float | None
    budget_met: bool
    server_time_ms: float
    routing_time_ms: float = Field(
        ..., description="routing decisions for all samples (router + planner, or the single-stage policy)"
    )
    fallbacks: int = Field(..., description="backend calls retried on another variant")


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class VariantStatus(BaseModel):
    key: str
    precision: str
    triton_name: str
    healthy: bool
    detail: str
    routable: bool = Field(..., description="healthy and not taken out by the failure breaker")
    val_accuracy: float | None
    latency: dict[str, float | int]
    routed_samples: int
    failures: int
    batching: dict[str, Any] | None = None  # the backend's batching counts (Ray: replicas, calls, replicas_seen)
    loaded: bool = Field(..., description="the variant's model is loaded (Triton: ready on the server)")
    loaded_reason: str = Field(..., description="why it is loaded or not (start-up, memory policy, server down, ...)")


class SingleStageStatus(BaseModel):
    in_use: bool = Field(..., description="true: no router (none in the repository, or planner.enabled false)")
    summary: str = Field(..., description="one line: what single-stage routing ranks the variants by")
    source: str = Field(..., description="manifest: each variant's validation accuracy, the same for every sample")
    accuracy: dict[str, float] = Field(..., description="variant key → p(correct) single-stage routing uses")
    unmeasured: list[str] = Field(..., description="variants without a validation accuracy (ranked by precision)")


class VersionStatus(BaseModel):
    version: int
    state: str = Field(..., description="loading | serving | canary | retired | failed, in this worker")
    since: str = Field(..., description="UTC time it entered the state")
    requests: int = Field(..., description="requests it served in this worker")
    in_flight: int = Field(..., description="requests and mirrored calls on it now")
    detail: str = Field(..., description="why it failed or was retired")


class StatusResponse(BaseModel):
    model: str
    version: int = Field(..., description="the model version serving (the canary's share aside)")
    versions: list[VersionStatus] = Field(..., description="every model version this worker holds or held")
    canary: dict[str, Any] | None = Field(None, description="the canary: its shares and mirrored comparisons")
    backend: str
    ready: bool
    single_stage: SingleStageStatus
    router: dict[str, Any] = Field(..., description="two-stage routing: the router's summary, plans, follow-up counts")
    speed_router: dict[str, Any] = Field(
        default_factory=dict,
        description="the cheap entry (X-Priority: speed): in use or why not, its variant, plans, samples entered "
        "and escalated",
    )
    variants: list[VariantStatus]
    in_flight_requests: int
    process: dict[str, Any]
    gateway: dict[str, Any] = Field(default_factory=dict, description="RSS and CPU of all the gateway's processes")
    routing: dict[str, Any]
    uptime_s: float
    model_control: str = Field(..., description="none | explicit (the gateway loads/unloads Triton models)")
    memory: dict[str, Any] = Field(..., description="the memory-pressure policy: thresholds, last measurement, actions")
    profile: dict[str, Any] = Field(
        ..., description="the latency profiles the planner uses: from the manifest or measured at start-up, and why"
    )


class ModelsResponse(BaseModel):
    model: str
    classes: list[str]
    input: dict[str, Any]
    output: dict[str, Any]
    variants: list[dict[str, Any]]
    training: dict[str, Any]
