"""A small model repository for gateway tests, built without torch.

Three tiny ONNX classifiers made with onnx.helper, same contract as the real export
(input "images" FP32 (N, 3, 32, 32), output "logits" FP32 (N, 10)):
  fp32: Conv(3→8, 3×3) → Relu → GlobalAveragePool → Flatten → Gemm(8→10)
  fp16: the same weights in FP16, with Cast nodes at the input and the output
  int8: QDQ: QuantizeLinear/DequantizeLinear on the input and on every weight
plus config.pbtxt per variant and a manifest.json written through adaptive_quant.core.manifest,
with latency profiles in ms that the tests' budgets are chosen against.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from adaptive_quant.core.host import describe_host
from adaptive_quant.core.images import encode_png
from adaptive_quant.core.manifest import (
    LatencyPoint,
    LatencyProfile,
    Manifest,
    VariantEntry,
    save_manifest,
    sha256_file,
)
from adaptive_quant.core.precision import Precision, triton_model_name
from adaptive_quant.data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD

MODEL = "tiny"
# p95 ms at batch 1, deliberately far above what these tiny graphs take (~0.1 ms) so that
# budgets in tests decide routing by the profile, not by the busy test machine's jitter
P95_MS_BATCH1 = {"fp32": 80.0, "fp16": 90.0, "int8": 30.0}
BATCH_FACTOR = {1: 1.0, 8: 3.0, 32: 8.0, 64: 15.0}  # p95 at batch b = P95_MS_BATCH1 × factor
VAL_ACCURACY = {"fp32": 0.92, "fp16": 0.919, "int8": 0.91}


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(0, 0.5, size=(8, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, size=(8,)).astype(np.float32),
        "w2": rng.normal(0, 1.0, size=(10, 8)).astype(np.float32),
        "b2": rng.normal(0, 0.1, size=(10,)).astype(np.float32),
    }


def _io(elem: int = TensorProto.FLOAT):
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    return x, y


def _body(prefix_in: str, w: dict[str, str], out: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Conv", [prefix_in, w["w1"], w["b1"]], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["g1"]),
        helper.make_node("Flatten", ["g1"], ["f1"], axis=1),
        helper.make_node("Gemm", ["f1", w["w2"], w["b2"]], [out], transB=1),
    ]


def _model(nodes, inits, name: str) -> onnx.ModelProto:
    x, y = _io()
    graph = helper.make_graph(nodes, name, [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="gateway_repo")
    model.ir_version = 9  # readable by every ONNX Runtime this project pins
    onnx.checker.check_model(model)
    return model


def make_fp32(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    return _model(_body("images", {k: k for k in w}, "logits"), inits, "tiny_fp32")


def make_fp16(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(v.astype(np.float16), k) for k, v in w.items()]
    nodes = [helper.make_node("Cast", ["images"], ["x16"], to=TensorProto.FLOAT16)]
    nodes += _body("x16", {k: k for k in w}, "logits16")
    nodes.append(helper.make_node("Cast", ["logits16"], ["logits"], to=TensorProto.FLOAT))
    return _model(nodes, inits, "tiny_fp16")


def make_int8(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    inits, nodes = [], []

    def qdq_weight(name: str, arr: np.ndarray) -> str:
        scale = float(np.abs(arr).max() / 127.0)
        inits.append(numpy_helper.from_array(np.clip(np.round(arr / scale), -127, 127).astype(np.int8), f"{name}_q"))
        inits.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{name}_s"))
        inits.append(numpy_helper.from_array(np.array(0, dtype=np.int8), f"{name}_z"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"]))
        return f"{name}_dq"

    inits.append(numpy_helper.from_array(np.array(0.03, dtype=np.float32), "x_s"))  # input scale: ±3.8 std
    inits.append(numpy_helper.from_array(np.array(0, dtype=np.int8), "x_z"))
    nodes.append(helper.make_node("QuantizeLinear", ["images", "x_s", "x_z"], ["x_q"]))
    nodes.append(helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"]))
    names = {"w1": qdq_weight("w1", w["w1"]), "w2": qdq_weight("w2", w["w2"])}
    for b in ("b1", "b2"):  # biases stay FP32, as the QDQ exporters leave them
        inits.append(numpy_helper.from_array(w[b], b))
        names[b] = b
    nodes += _body("x_dq", names, "logits")
    return _model(nodes, inits, "tiny_int8")


CONFIG_PBTXT = """name: "{name}"
backend: "onnxruntime"
max_batch_size: 64
input [ {{ name: "images" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] }} ]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ 10 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 100 }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def _profile(key: str) -> LatencyProfile:
    base = P95_MS_BATCH1[key]
    batches = {
        str(b): LatencyPoint(p50_ms=base * f * 0.8, p95_ms=base * f, throughput=b / (base * f * 0.8 / 1e3))
        for b, f in BATCH_FACTOR.items()
    }
    # synthetic figures the tests' budgets are chosen against, labelled as this host's so that the
    # gateway's start-up re-profiling (profiling.mode auto) keeps them; test_profiling forces it
    host = {**describe_host(ort.__version__, 0), "note": "synthetic test fixture"}
    return LatencyProfile(host=host, batches=batches)


def build_repo(root: str | Path) -> Path:
    """Write the repository under `root` and return its path."""
    root = Path(root)
    w = _weights()
    models = {"fp32": make_fp32(w), "fp16": make_fp16(w), "int8": make_int8(w)}
    variants = {}
    for key, model in models.items():
        name = triton_model_name(MODEL, Precision(key))
        path = root / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, path)
        (root / name / "config.pbtxt").write_text(CONFIG_PBTXT.format(name=name))
        variants[key] = VariantEntry(
            key=key,
            precision=key,
            triton_name=name,
            path=str(path.relative_to(root)),
            sha256=sha256_file(path),
            size_bytes=path.stat().st_size,
            val_accuracy=VAL_ACCURACY[key],
            agreement_with_fp32=1.0 if key == "fp32" else 0.98,
            latency=_profile(key),
        )
    manifest = Manifest(
        model_name=MODEL,
        classes=list(CIFAR10_CLASSES),
        input_name="images",
        output_name="logits",
        image_size=32,
        mean=list(CIFAR10_MEAN),
        std=list(CIFAR10_STD),
        variants=variants,
        training={"mlflow_run_id": None, "git_commit": "test"},
        created_at="2026-11-22T00:00:00Z",
    )
    save_manifest(root, manifest)
    return root


def images(n: int, seed: int = 0) -> np.ndarray:
    """(n, 32, 32, 3) uint8, uniform random pixels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def b64_instance(image: np.ndarray) -> dict[str, str]:
    return {"b64": base64.b64encode(encode_png(image)).decode()}


def pixels_instance(image: np.ndarray) -> dict[str, list]:
    return {"pixels": image.tolist()}
