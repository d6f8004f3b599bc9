"""The Open Inference Protocol (KServe v2) over gRPC: `inference.GRPCInferenceService`, what
`tritonclient.grpc` and most production callers of Triton speak, on its own port
(server.grpc_port), in the gateway's process and event loop (grpc.aio).

  ServerLive, ServerReady                      probes (open without an API key)
  ModelReady, ServerMetadata, ModelMetadata    as fronts/v2_rest.py answers them over HTTP
  ModelConfig                                  Triton's ModelConfig message
  ModelInfer                                   inference, routed per sample
  everything else (streaming, repository, statistics, shared memory, trace, logging): UNIMPLEMENTED

The messages are the protos that ship with tritonclient. One codec (v2_codec.py) and one
dataplane behind both v2 fronts: a ModelInferRequest goes through the codec's checks (the same
refusal, word for word, as over HTTP, but for naming raw_input_contents where HTTP says
binary_data_size), routing_options, and DataPlane.serve and classify, so in-flight, outcome and
request-time metrics count every front alike.

Inputs: raw_input_contents (tritonclient's way, one little-endian blob per input), or typed
InferTensorContents (fp32_contents for images, uint_contents for pixels). Outputs come back as
raw_output_contents, as Triton answers them. Parameters (InferParameter) as over HTTP:
latency_budget_ms, priority or routing_priority, min_precision; gRPC metadata stands in for
the REST headers (x-latency-budget-ms, ...). The response parameters are the HTTP front's.

Errors: the error table (errors.py) gives a refusal's gRPC code, with the same message as over HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from adaptive_quant.serving.auth import key_problem, presented_key
from adaptive_quant.serving.dataplane import DataPlane, Ticket, precision_header
from adaptive_quant.serving.errors import GRPC_KEY_HOW, InputError, Refusal, Unauthorized, refusal
from adaptive_quant.serving.v2_codec import (
    IMAGES,
    PIXELS,
    PLATFORM,
    SERVER_NAME,
    SERVER_VERSION,
    SHARED_MEMORY_REFUSED,
    VERSION,
    InferRequest,
    ProtocolError,
    answer_tensors,
    check_byte_size,
    check_tensor,
    input_specs,
    model_config,
    model_input,
    model_metadata,
    output_tensors,
    requested_outputs,
    response_parameters,
    routing_options,
    tensor_bytes,
    tensor_from_bytes,
    tensor_from_values,
    unknown_input,
)

if TYPE_CHECKING:
    from adaptive_quant.core.manifest import Manifest

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
EXTENSIONS = ["classification", "parameters"]
SERVED = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig", "ModelInfer")
OPEN = frozenset({"ServerLive", "ServerReady"})  # probes: orchestrators call them without secrets
# the typed contents field each input takes (Triton's rule: UINT8 travels as uint32 values)
CONTENTS_FIELD = {"FP32": "fp32_contents", "UINT8": "uint_contents"}
# bytes a ModelInferRequest may carry beyond the tensor limit: names, shapes, parameters
MESSAGE_SLACK_BYTES = 65_536


async def abort(context: grpc.aio.ServicerContext, r: Refusal) -> NoReturn:
    """End the RPC with the error table's code for `r`, its message, Retry-After as a trailer."""
    await context.abort(r.kind.grpc_code, r.message, trailing_metadata=r.grpc_trailers())
    raise AssertionError("context.abort raises")  # pragma: no cover


# ------------------------------------------------------------------------------- the codec


def parameter_value(p: service_pb2.InferParameter) -> Any:
    """An InferParameter → its Python value (None when none of its fields is set)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def set_parameter(p: service_pb2.InferParameter, value: Any) -> None:
    if isinstance(value, bool):  # before int: a bool is an int to Python
        p.bool_param = value
    elif isinstance(value, (int, np.integer)):
        p.int64_param = int(value)
    elif isinstance(value, (float, np.floating)):
        p.double_param = float(value)
    else:
        p.string_param = str(value)


def _parameters(params: Mapping[str, service_pb2.InferParameter]) -> dict[str, Any]:
    return {k: parameter_value(v) for k, v in params.items()}


def parse_grpc_request(request: service_pb2.ModelInferRequest, manifest: Manifest, max_instances: int) -> InferRequest:
    """A ModelInferRequest → the model input and what to answer, by v2_codec.py's checks."""
    if not request.inputs:
        raise ProtocolError(f"'inputs' must be a non-empty list of tensors; accepted inputs: {IMAGES!r} or {PIXELS!r}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(
            f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs; send one per input, "
            "in input order, or none (typed contents)"
        )
    specs = {t.name: t for t in input_specs(manifest)}
    tensors: dict[str, np.ndarray] = {}
    for i, inp in enumerate(request.inputs):
        spec = specs.get(inp.name)
        if spec is None:
            raise unknown_input(i, inp.name, manifest)
        if inp.name in tensors:
            raise ProtocolError(f"input {inp.name!r} appears twice")
        shape = check_tensor(spec, inp.datatype, list(inp.shape), max_instances)
        if "shared_memory_region" in inp.parameters:
            raise ProtocolError(SHARED_MEMORY_REFUSED)
        field = CONTENTS_FIELD[spec.datatype]
        sent = [f.name for f, _ in inp.contents.ListFields()]  # the typed fields that hold values
        if raw:
            if sent:
                raise ProtocolError(f"input {inp.name!r} has both raw_input_contents and contents; send one")
            check_byte_size(spec, shape, len(raw[i]), f"raw_input_contents[{i}]")
            tensors[inp.name] = tensor_from_bytes(raw[i], spec, shape)
        elif sent == [field]:
            tensors[inp.name] = tensor_from_values(getattr(inp.contents, field), spec, shape, f"contents.{field}")
        elif sent:
            raise ProtocolError(f"input {inp.name!r} ({spec.datatype}) takes contents.{field}, got contents.{sent[0]}")
        else:
            raise ProtocolError(f"input {inp.name!r} has no data: send raw_input_contents or contents.{field}")
    x = model_input(tensors, manifest)
    wanted = [{"name": o.name, "parameters": _parameters(o.parameters)} for o in request.outputs]
    outputs = requested_outputs(wanted or None, manifest, binary_all=True)  # binary: raw_output_contents
    return InferRequest(x=x, id=request.id or None, parameters=_parameters(request.parameters), outputs=outputs)


def encode_grpc_response(
    model_name: str,
    request: InferRequest,
    tensors: Mapping[str, tuple[str, Any]],
    probs: np.ndarray,
    classes: list[str],
    parameters: Mapping[str, Any],
    model_version: str = VERSION,
) -> service_pb2.ModelInferResponse:
    """The answer as Triton sends it: output descriptions, their bytes in raw_output_contents;
    `model_version`: the version that answered."""
    response = service_pb2.ModelInferResponse(model_name=model_name, model_version=model_version, id=request.id or "")
    for key, value in parameters.items():
        set_parameter(response.parameters[key], value)
    for want, datatype, shape, values in answer_tensors(request.outputs, tensors, probs, classes):
        response.outputs.add(name=want.name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(tensor_bytes(datatype, values))
    return response


# ------------------------------------------------------------------------------- the service


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over one dataplane (`plane`)."""

    def __init__(self, plane: DataPlane, api_key: str = "") -> None:
        self.plane = plane
        self.key = api_key.encode() if api_key else None

    async def _check_key(self, context: grpc.aio.ServicerContext, method: str) -> None:
        """Abort UNAUTHENTICATED unless the call carries the key (metadata x-api-key or
        authorization: Bearer), by the HTTP fronts' rule (auth.py)."""
        if self.key is None:
            return
        metadata = [(k.encode(), v.encode()) for k, v in context.invocation_metadata() or () if isinstance(v, str)]
        reason = key_problem(presented_key(metadata), self.key)
        if reason is None:
            return
        log.warning("UNAUTHENTICATED for gRPC %s from %s: %s", method, context.peer(), reason)
        self.plane.metrics.unauthorized.inc()
        await abort(context, refusal(Unauthorized(reason, GRPC_KEY_HOW)))

    async def _model(self, context: grpc.aio.ServicerContext, method: str, name: str, version: str) -> str | None:
        """The caller's key checked, then the model it names → None (routed) or a variant key."""
        await self._check_key(context, method)
        try:
            return self.plane.resolve_model(name, version)
        except InputError as exc:
            r = refusal(exc)
        await abort(context, r)

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        variant = await self._model(context, "ModelReady", request.name, request.version)
        return service_pb2.ModelReadyResponse(ready=self.plane.model_ready(variant))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._check_key(context, "ServerMetadata")
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._model(context, "ModelMetadata", request.name, request.version)
        meta = model_metadata(self.plane.manifest, request.name, PLATFORM, self.plane.versions())
        return json_format.ParseDict(meta, service_pb2.ModelMetadataResponse())

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        variant = await self._model(context, "ModelConfig", request.name, request.version)
        plane = self.plane
        config = model_config(plane.manifest, request.name, plane.settings.limits.max_instances, variant)
        return service_pb2.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        await self._check_key(context, "ModelInfer")
        plane = self.plane
        # gRPC metadata in place of the REST headers (lower-case names, as gRPC sends them)
        headers = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}

        async def work(ticket: Ticket) -> service_pb2.ModelInferResponse:
            variant = plane.resolve_model(request.model_name, request.model_version, ticket)
            settings = plane.settings
            parsed = parse_grpc_request(request, ticket.model.manifest, settings.limits.max_instances)
            options, ignored = routing_options(parsed.parameters, headers, settings.routing.default_priority, variant)
            result = await plane.classify(parsed.x, options, started, ticket)
            params = response_parameters(result, precision_header(set(result.precisions)), options.budget_ms, ignored)
            tensors = output_tensors(result.probs, result.passes, result.precisions)
            return encode_grpc_response(
                request.model_name, parsed, tensors, result.probs, result.classes, params, str(result.version)
            )

        answer: service_pb2.ModelInferResponse | Refusal = await plane.serve(started, work, lambda r: r)
        if isinstance(answer, Refusal):
            await abort(context, answer)
        return answer


def _unimplemented(name: str) -> Any:
    async def method(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{SERVICE}/{name} is not served here; served: {', '.join(SERVED)}",
        )

    method.__name__ = name
    return method


for _method in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
    if _method.name not in SERVED:  # streaming, repository, statistics, shared memory, trace, logging
        setattr(InferenceServicer, _method.name, _unimplemented(_method.name))


# ------------------------------------------------------------------------------- the server


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcFront:
    """The gRPC server of one gateway: started by the app's lifespan once the service is ready;
    stopped (new RPCs refused, those in flight given `grace` s, then cancelled) when the HTTP
    server begins its drain, and again, idempotently, when the lifespan ends."""

    def __init__(
        self, plane: DataPlane, host: str, port: int, api_key: str, max_request_bytes: int, share_port: bool = False
    ) -> None:
        self.address = listen_address(host, port)
        limit = max_request_bytes + MESSAGE_SLACK_BYTES  # larger messages: RESOURCE_EXHAUSTED from grpc itself
        options: Sequence[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # grpc's Linux default lets a second process bind the same port and take half the
            # calls; off, a port already in use is an error at start-up. Several workers of one
            # gateway share it on purpose (share_port; the supervisor has checked the port is free)
            ("grpc.so_reuseport", 1 if share_port else 0),
        ]
        self.server = grpc.aio.server(options=options)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane, api_key), self.server)
        self._stopping: Any = None

    async def start(self) -> None:
        try:
            bound = self.server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise RuntimeError(
                f"server.grpc_port: cannot listen on {self.address} ({exc}); is the port in use?"
            ) from None
        if not bound:
            raise RuntimeError(f"server.grpc_port: cannot listen on {self.address}; is the port in use?")
        await self.server.start()

    async def stop(self, grace_s: float) -> None:
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self.server.stop(grace_s))
        await self._stopping
