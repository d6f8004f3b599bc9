"""The Open Inference Protocol (KServe v2) codec: pure functions between the protocol's JSON and
binary tensors and the gateway's types. No I/O and no service here: fronts/v2_rest.py serves
them over HTTP, fronts/v2_grpc.py over gRPC; the models by name are the dataplane's.

What a caller sees (the model metadata says the same):
  inputs   images  FP32  [N, 3, H, W]  normalised as the manifest says (what the variants take)
           pixels  UINT8 [N, H, W, 3]  RGB images, normalised by the gateway (one of the two)
  outputs  logits     FP32  [N, C]  log of the answer's probabilities: softmax(logits) is the
                                    average over the passes that ran, the label its argmax
           passes     BYTES [N]     the passes that answered each sample, "int8,int8:hflip"
           precision  BYTES [N]     the highest precision among them
  request parameters: latency_budget_ms, priority (or routing_priority), min_precision
  response parameters: precision, budget_met, server_time_ms, followups, followups_lost, fallbacks

`priority` is also a parameter Triton reserves: the integer scheduling priority that
tritonclient's `infer(priority=N)` sends. A string there is our routing priority; an integer is
Triton's and has nothing to act on here (no priority queues), so it is accepted and ignored.
tritonclient refuses reserved names in `parameters=`, hence the `routing_priority` alias.

The binary tensor extension: the body is the JSON header (Inference-Header-Content-Length
bytes) followed by each binary tensor's raw little-endian bytes, in input order, each input
saying its size in parameters.binary_data_size; BYTES elements are a 4-byte little-endian length
and the bytes. Outputs come back binary when the request says binary_data (per output) or
binary_data_output (for all), which tritonclient does by default.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from adaptive_quant.core.images import to_model_input
from adaptive_quant.core.manifest import Manifest
from adaptive_quant.core.routing import Priority
from adaptive_quant.serving.errors import InputError, PayloadTooLarge, ProtocolError
from adaptive_quant.serving.options import (
    BUDGET_HEADER,
    FLOOR_HEADER,
    PRIORITY_HEADER,
    ClassifyOptions,
    parse_budget,
    parse_floor,
    parse_priority,
)

if TYPE_CHECKING:
    from adaptive_quant.serving.service import ClassifyResult
IMAGES, PIXELS = "images", "pixels"
LOGITS, PASSES, PRECISION = "logits", "passes", "precision"
VERSION = "1"  # a repository's version without versions.json
SERVER_NAME, PLATFORM = "adaptive-quant", "adaptive_quant"  # what server and model metadata say
try:
    SERVER_VERSION = metadata.version(SERVER_NAME)
except metadata.PackageNotFoundError:  # running from a source tree without an install
    SERVER_VERSION = "0+unknown"
# |value| accepted in the FP32 input: normalised CIFAR pixels lie within about ±3; far beyond
# that the variants' logits overflow, and the answer would be NaN rather than an error
MAX_ABS_INPUT = 1e3
BUDGET_PARAM, PRIORITY_PARAM, PRIORITY_ALIAS, FLOOR_PARAM = (
    "latency_budget_ms",
    "priority",
    "routing_priority",
    "min_precision",
)
BINARY_OUTPUT_PARAM = "binary_data_output"  # Triton's: every output in the binary extension
SEQUENCE_PARAMS = frozenset({"sequence_id", "sequence_start", "sequence_end"})

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


# ------------------------------------------------------------------------------- model description


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 = any (the batch dimension)


def input_specs(manifest: Manifest) -> tuple[TensorSpec, TensorSpec]:
    s = manifest.image_size
    return TensorSpec(IMAGES, "FP32", (-1, 3, s, s)), TensorSpec(PIXELS, "UINT8", (-1, s, s, 3))


def output_specs(manifest: Manifest) -> tuple[TensorSpec, ...]:
    return (
        TensorSpec(LOGITS, "FP32", (-1, len(manifest.classes))),
        TensorSpec(PASSES, "BYTES", (-1,)),
        TensorSpec(PRECISION, "BYTES", (-1,)),
    )


def model_metadata(manifest: Manifest, name: str, platform: str, versions: list[str] | None = None) -> dict[str, Any]:
    """GET /v2/models/{name}: the protocol's model metadata; `versions`: the live model versions."""

    def spec(t: TensorSpec) -> dict[str, Any]:
        return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}

    return {
        "name": name,
        "versions": versions or [str(manifest.version)],
        "platform": platform,
        "inputs": [spec(t) for t in input_specs(manifest)],
        "outputs": [spec(t) for t in output_specs(manifest)],
    }


def config_type(datatype: str) -> str:
    """A protocol datatype → Triton's model-configuration enum name (BYTES is TYPE_STRING there)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def model_config(manifest: Manifest, name: str, max_batch_size: int, variant: str | None) -> dict[str, Any]:
    """GET /v2/models/{name}/config, in the shape of Triton's model configuration (JSON): dims
    without the batch dimension, both inputs optional (a request sends one of them)."""
    tensors_in, tensors_out = input_specs(manifest), output_specs(manifest)

    def dims(t: TensorSpec) -> list[int]:
        return list(t.shape[1:])

    return {
        "name": name,
        "platform": "adaptive_quant",
        "max_batch_size": max_batch_size,
        "input": [
            {"name": t.name, "data_type": config_type(t.datatype), "dims": dims(t), "optional": True}
            for t in tensors_in
        ],
        "output": [{"name": t.name, "data_type": config_type(t.datatype), "dims": dims(t)} for t in tensors_out],
        "parameters": {
            "classes": {"string_value": ",".join(manifest.classes)},
            "mean": {"string_value": ",".join(str(v) for v in manifest.mean)},
            "std": {"string_value": ",".join(str(v) for v in manifest.std)},
            "routing": {
                "string_value": f"pinned to variant {variant}"
                if variant
                else "two-stage per sample; request parameters latency_budget_ms, priority "
                "(or routing_priority), min_precision"
            },
        },
    }


# ------------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0  # > 0: the classification extension's top-k strings instead of the tensor


@dataclass
class InferRequest:
    x: np.ndarray  # (N, 3, H, W) float32: the model input
    id: str | None
    parameters: dict[str, Any]
    outputs: list[RequestedOutput]  # in the order to answer them
    ignored: list[str] = field(default_factory=list)  # parameter names accepted but not acted on


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary tail, by the Inference-Header-Content-Length header."""
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.strip().isdigit() or int(header_length) > len(body):
        raise ProtocolError(
            f"Inference-Header-Content-Length must be the byte length of the JSON header, an integer from 0 "
            f"to the body's {len(body)} bytes; got {header_length!r}"
        )
    n = int(header_length)
    return body[:n], memoryview(body)[n:]


def parse_infer_request(body: bytes, header_length: str | None, manifest: Manifest, max_instances: int) -> InferRequest:
    """An infer request's body → the model input and what to answer. Every refusal is a
    ProtocolError whose message says what was wrong and what is accepted."""
    head, tail = split_body(body, header_length)
    if not head:
        raise ProtocolError("empty request: send a JSON object with an 'inputs' list")
    try:
        req = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the request header is not JSON ({exc})") from None
    if not isinstance(req, dict):
        raise ProtocolError(f"the request must be a JSON object with an 'inputs' list, got {type(req).__name__}")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ProtocolError(f"'id' must be a string, got {rid!r}")
    params = _object(req.get("parameters"), "parameters")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(f"'inputs' must be a non-empty list of tensors; accepted inputs: {IMAGES!r} or {PIXELS!r}")
    specs = {t.name: t for t in input_specs(manifest)}
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for i, inp in enumerate(inputs):
        if not isinstance(inp, dict):
            raise ProtocolError(f"inputs[{i}] must be an object with name, shape, datatype and data")
        name = inp.get("name")
        if name not in specs:
            raise unknown_input(i, name, manifest)
        if name in tensors:
            raise ProtocolError(f"input {name!r} appears twice")
        array, offset = decode_tensor(inp, specs[name], tail, offset, max_instances)
        tensors[name] = array
    if offset != len(tail):
        raise ProtocolError(
            f"the body carries {len(tail)} bytes after the JSON header, but the inputs' binary_data_size add up "
            f"to {offset}"
        )
    x = model_input(tensors, manifest)
    binary_all = params.get(BINARY_OUTPUT_PARAM, False)
    if not isinstance(binary_all, bool):
        raise ProtocolError(f"parameter binary_data_output must be true or false, got {binary_all!r}")
    outputs = requested_outputs(req.get("outputs"), manifest, binary_all)
    return InferRequest(x=x, id=rid, parameters=params, outputs=outputs)


def decode_tensor(
    inp: dict[str, Any], spec: TensorSpec, tail: memoryview, offset: int, max_instances: int
) -> tuple[np.ndarray, int]:
    """One input tensor (JSON `data`, or its slice of the binary tail from `offset`) → an array
    of the spec's shape; returns it and the offset after its bytes."""
    name = spec.name
    shape = check_tensor(spec, inp.get("datatype"), inp.get("shape"), max_instances)
    p = _object(inp.get("parameters"), f"inputs {name!r} parameters")
    if "shared_memory_region" in p:
        raise ProtocolError(SHARED_MEMORY_REFUSED)
    size = p.get("binary_data_size")
    if size is not None:
        if "data" in inp:
            raise ProtocolError(f"input {name!r} has both 'data' and binary_data_size; send one")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(f"input {name!r}: binary_data_size must be a byte count, got {size!r}")
        check_byte_size(spec, shape, size, "binary_data_size")
        if offset + size > len(tail):
            raise ProtocolError(
                f"input {name!r}: binary_data_size {size} runs past the body's end ({len(tail) - offset} bytes left)"
            )
        return tensor_from_bytes(tail[offset : offset + size], spec, shape), offset + size
    data = inp.get("data")
    if data is None:
        raise ProtocolError(f"input {name!r} has no 'data' (and no binary_data_size parameter)")
    return tensor_from_values(_flatten(data, name), spec, shape, "'data'"), offset


# the checks and conversions below are transport-neutral: fronts/v2_grpc.py runs the same ones on a
# ModelInferRequest's tensors, so both fronts refuse a request with the same message
SHARED_MEMORY_REFUSED = "shared-memory inputs are not supported here; send the data in the request"


def check_tensor(spec: TensorSpec, datatype: Any, shape: Any, max_instances: int) -> list[int]:
    """An input's declared datatype and shape against its spec; returns the shape."""
    name = spec.name
    if datatype != spec.datatype:
        raise ProtocolError(f"input {name!r} must have datatype {spec.datatype}, got {datatype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of integers, got {shape!r}")
    want = list(spec.shape)
    if len(shape) != len(want) or any(w != -1 and d != w for d, w in zip(shape, want)) or shape[0] < 1:
        shown = ["N", *want[1:]]
        raise ProtocolError(f"input {name!r} must have shape {shown} with N ≥ 1, got {shape}")
    if shape[0] > max_instances:
        raise PayloadTooLarge(f"input {name!r} holds {shape[0]} images; at most {max_instances} per request")
    return shape


def check_byte_size(spec: TensorSpec, shape: list[int], size: int, what: str) -> None:
    """`size` bytes (named `what` in the message: binary_data_size, raw_input_contents[0]) must
    be exactly what `shape` of the spec's datatype takes."""
    expected = math.prod(shape) * DTYPES[spec.datatype].itemsize
    if size != expected:
        raise ProtocolError(
            f"input {spec.name!r}: {what} is {size} bytes, but shape {shape} of {spec.datatype} needs {expected}"
        )


def tensor_from_bytes(raw: bytes | memoryview, spec: TensorSpec, shape: list[int]) -> np.ndarray:
    """Little-endian raw bytes (size already checked) → the array, without a copy."""
    return np.frombuffer(raw, dtype=DTYPES[spec.datatype]).reshape(shape)


def tensor_from_values(flat: Sequence[Any], spec: TensorSpec, shape: list[int], what: str) -> np.ndarray:
    """A flat sequence of numbers (JSON `data`, a gRPC InferTensorContents field, named `what`)
    → the array; UINT8 values must be integers from 0 to 255."""
    name, count = spec.name, math.prod(shape)
    if len(flat) != count:
        raise ProtocolError(f"input {name!r}: shape {shape} needs {count} values, {what} holds {len(flat)}")
    kind = "integers from 0 to 255" if spec.datatype == "UINT8" else "numbers"
    try:
        array = np.asarray(flat, dtype=np.float64)
    except (TypeError, ValueError):
        raise ProtocolError(f"input {name!r}: {what} must hold {kind}") from None
    integral = (array >= 0) & (array <= 255) & (array == np.round(array))
    if spec.datatype == "UINT8" and not integral.all():
        raise ProtocolError(f"input {name!r}: {what} must hold {kind}")
    return array.astype(DTYPES[spec.datatype]).reshape(shape)


def model_input(tensors: Mapping[str, np.ndarray], manifest: Manifest) -> np.ndarray:
    """The decoded inputs (name → array) → x (N, 3, H, W) float32, normalised here when the
    caller sent pixels (N, H, W, 3) uint8. Exactly one input, finite values."""
    if len(tensors) != 1:
        raise ProtocolError(f"send one input, {IMAGES!r} or {PIXELS!r}, not both")
    images = tensors.get(PIXELS)
    if images is not None:
        return to_model_input(images, manifest.mean, manifest.std)
    x = np.ascontiguousarray(tensors[IMAGES], dtype=np.float32)
    if not np.isfinite(x).all() or np.abs(x).max() > MAX_ABS_INPUT:
        raise ProtocolError(
            f"input {IMAGES!r} must hold finite values within ±{MAX_ABS_INPUT:g} (normalised pixels: "
            f"(pixel / 255 - mean) / std, mean {manifest.mean}, std {manifest.std})"
        )
    return x


def unknown_input(index: int, name: Any, manifest: Manifest) -> ProtocolError:
    size = manifest.image_size
    return ProtocolError(
        f"inputs[{index}]: unknown input {name!r}; this model takes {IMAGES!r} (FP32 [N, 3, {size}, {size}], "
        f"normalised) or {PIXELS!r} (UINT8 [N, {size}, {size}, 3])"
    )


def _flatten(data: Any, name: str) -> list[Any]:
    """The protocol allows 'data' flat or nested in row-major order."""
    if not isinstance(data, list):
        raise ProtocolError(f"input {name!r}: 'data' must be a list of values (flat or nested, row-major)")
    if not data or not isinstance(data[0], list):
        out = data
    else:
        out = []
        stack = [data]
        while stack:  # iterative: a deeply nested list cannot exhaust the recursion limit
            item = stack.pop()
            if isinstance(item, list):
                stack.extend(reversed(item))
            else:
                out.append(item)
    if any(isinstance(v, (bool, str, dict, list)) or v is None for v in out):
        raise ProtocolError(f"input {name!r}: 'data' must hold numbers only")
    return out


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {value!r}")
    return value


def requested_outputs(outputs: Any, manifest: Manifest, binary_all: bool) -> list[RequestedOutput]:
    """The outputs a request asks for (a list of {name, parameters} objects; None = all), checked."""
    names = [t.name for t in output_specs(manifest)]
    if outputs is None:
        return [RequestedOutput(n, binary_all) for n in names]
    if not isinstance(outputs, list):
        raise ProtocolError(f"'outputs' must be a list of {{name, parameters}} objects; outputs: {names}")
    out = []
    for i, o in enumerate(outputs):
        if not isinstance(o, dict) or o.get("name") not in names:
            got = o.get("name") if isinstance(o, dict) else o
            raise ProtocolError(f"outputs[{i}]: unknown output {got!r}; this model's outputs: {names}")
        p = _object(o.get("parameters"), f"output {o['name']!r} parameters")
        binary = p.get("binary_data", binary_all)
        if not isinstance(binary, bool):
            raise ProtocolError(f"output {o['name']!r}: binary_data must be true or false, got {binary!r}")
        k = p.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ProtocolError(f"output {o['name']!r}: classification must be a count of classes ≥ 0, got {k!r}")
        if k and o["name"] != LOGITS:
            raise ProtocolError(f"output {o['name']!r}: classification applies to {LOGITS!r} only")
        out.append(RequestedOutput(o["name"], binary, min(k, len(manifest.classes))))
    return out


def routing_options(
    params: Mapping[str, Any], headers: Mapping[str, str], default_priority: Priority, variant: str | None
) -> tuple[ClassifyOptions, list[str]]:
    """Request parameters (or, where a parameter is absent, the REST front's headers) → options,
    and the names of parameters accepted without effect. A bad value is a 400 naming it."""
    ignored = []
    for key in params:
        if key in SEQUENCE_PARAMS:
            if params[key] not in (0, "", False, None):
                raise ProtocolError(f"parameter {key}: this model is not stateful; leave sequence parameters out")
        elif key not in (BUDGET_PARAM, PRIORITY_PARAM, PRIORITY_ALIAS, FLOOR_PARAM, BINARY_OUTPUT_PARAM):
            ignored.append(key)
    budget = _param(params, headers, BUDGET_PARAM, BUDGET_HEADER, parse_budget)
    raw = params.get(PRIORITY_PARAM)
    if raw is not None and not isinstance(raw, str):
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            raise ProtocolError(
                f"parameter priority: a routing priority (quality, balanced, speed) or Triton's integer "
                f"scheduling priority, got {raw!r}"
            )
        ignored.append(PRIORITY_PARAM)  # Triton's scheduling priority: no priority queues here
        raw = None
    if raw is not None and PRIORITY_ALIAS in params and params[PRIORITY_ALIAS] != raw:
        raise ProtocolError(f"parameters priority {raw!r} and routing_priority {params[PRIORITY_ALIAS]!r} disagree")
    if raw is None:
        raw = params.get(PRIORITY_ALIAS)
    if raw is None:
        raw = headers.get(PRIORITY_HEADER)
    priority = default_priority if raw is None else _wrap(parse_priority, raw, PRIORITY_PARAM)
    floor = _param(params, headers, FLOOR_PARAM, FLOOR_HEADER, parse_floor)
    return ClassifyOptions(budget, priority, floor, variant), ignored


def _param(params: Mapping[str, Any], headers: Mapping[str, str], name: str, header: str, parse: Any) -> Any:
    if name in params:
        return _wrap(parse, params[name], f"parameter {name}")
    raw = headers.get(header)
    return None if raw is None else parse(raw)  # the header's own message


def _wrap(parse: Any, raw: Any, name: str) -> Any:
    try:
        return parse(raw, name)
    except InputError as exc:
        raise ProtocolError(exc.message) from None


# ------------------------------------------------------------------------------- the response


def output_tensors(
    probs: np.ndarray, passes: list[list[str]], precisions: list[str]
) -> dict[str, tuple[str, np.ndarray | list[bytes]]]:
    """The answer's tensors: name → (datatype, values)."""
    # a probability that underflowed to 0 would be -inf, which JSON cannot carry: floor it at
    # the smallest normal float32 (log ≈ -87.3, far below any class that matters)
    logits = np.log(np.maximum(probs, np.finfo(np.float32).tiny)).astype(np.float32)
    return {
        LOGITS: ("FP32", logits),
        PASSES: ("BYTES", [",".join(p).encode() for p in passes]),
        PRECISION: ("BYTES", [p.encode() for p in precisions]),
    }


def classification(probs: np.ndarray, k: int, classes: list[str]) -> list[bytes]:
    """Triton's classification extension: per sample the top k as "score:index:label", best first."""
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [f"{probs[i, c]:f}:{c}:{classes[c]}".encode() for i in range(len(probs)) for c in top[i]]


def answer_tensors(
    wanted: Sequence[RequestedOutput],
    tensors: Mapping[str, tuple[str, Any]],
    probs: np.ndarray,
    classes: list[str],
) -> list[tuple[RequestedOutput, str, list[int], Any]]:
    """The outputs a request asked for, in its order: (output, datatype, shape, values), the
    classification extension applied. Both fronts encode these (JSON/binary, or gRPC raw)."""
    n = len(probs)
    out = []
    for want in wanted:
        datatype, values = tensors[want.name]
        if want.classification:
            datatype, values = "BYTES", classification(probs, want.classification, classes)
            shape = [n, want.classification]
        else:
            shape = [n, *np.shape(values)[1:]] if datatype != "BYTES" else [n]
        out.append((want, datatype, shape, values))
    return out


def tensor_bytes(datatype: str, values: Any) -> bytes:
    """An output's raw little-endian bytes (BYTES: each element length-prefixed)."""
    return _bytes_blob(values) if datatype == "BYTES" else np.ascontiguousarray(values, "<f4").tobytes()


def encode_infer_response(
    model_name: str,
    request: InferRequest,
    tensors: Mapping[str, tuple[str, Any]],
    probs: np.ndarray,
    classes: list[str],
    parameters: Mapping[str, Any],
    model_version: str = VERSION,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (the value
    of Inference-Header-Content-Length), else None. `model_version`: the version that answered."""
    outputs, blobs = [], []
    for want, datatype, shape, values in answer_tensors(request.outputs, tensors, probs, classes):
        entry: dict[str, Any] = {"name": want.name, "datatype": datatype, "shape": shape}
        if want.binary:
            blob = tensor_bytes(datatype, values)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [v.decode() for v in values] if datatype == "BYTES" else values.reshape(-1).tolist()
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        head["id"] = request.id
    head["parameters"] = dict(parameters)
    head["outputs"] = outputs
    header = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def response_parameters(
    result: ClassifyResult, precision: str, budget_ms: float | None, ignored: list[str]
) -> dict[str, Any]:
    """An answered request's response parameters (a ClassifyResult's summary), for both fronts."""
    params: dict[str, Any] = {
        "precision": precision,
        "budget_met": result.budget_met,
        "server_time_ms": round(result.server_time_ms, 3),
        "followups": result.followups,
        "followups_lost": result.followups_lost,
        "fallbacks": result.fallbacks,
    }
    if budget_ms is not None:
        params["latency_budget_ms"] = budget_ms
    if ignored:
        params["ignored_parameters"] = ",".join(sorted(ignored))
    return params


def _bytes_blob(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)
