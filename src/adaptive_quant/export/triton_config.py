"""config.pbtxt text for one Triton model (pure: no I/O).

Two flavours over the same ONNX file:
- "onnxruntime": the production one, for NVIDIA's Triton container (ONNX Runtime backend).
- "python": a Python-backend model whose model.py runs ONNX Runtime, for the Triton binary that
  nvidia-pytriton ships (it has no onnxruntime backend).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TritonModelSpec:
    name: str
    input_name: str
    output_name: str
    image_size: int
    num_classes: int
    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = (8, 32, 64)
    max_queue_delay_us: int = 500  # µs a request may wait for others to form a batch
    instance_count: int = 1
    instance_kind: str = "KIND_AUTO"  # GPU when the server has one, else CPU
    flavor: str = "onnxruntime"


def render_config(spec: TritonModelSpec) -> str:
    """Render config.pbtxt; dims exclude the batch dimension (Triton adds it when max_batch_size > 0)."""
    if spec.flavor not in ("onnxruntime", "python"):
        raise ValueError(f"unknown Triton flavor {spec.flavor!r}; accepted: onnxruntime, python")
    preferred = ", ".join(str(b) for b in spec.preferred_batch_sizes if b <= spec.max_batch_size)
    header = (
        'backend: "onnxruntime"\nplatform: "onnxruntime_onnx"' if spec.flavor == "onnxruntime" else 'backend: "python"'
    )
    kind = "KIND_CPU" if spec.flavor == "python" else spec.instance_kind  # the python stub runs ORT on CPU
    in_dims = f"3, {spec.image_size}, {spec.image_size}"
    out_dims = str(spec.num_classes)
    return f"""name: "{spec.name}"
{header}
max_batch_size: {spec.max_batch_size}
input [
  {{
    name: "{spec.input_name}"
    data_type: TYPE_FP32
    dims: [ {in_dims} ]
  }}
]
output [
  {{
    name: "{spec.output_name}"
    data_type: TYPE_FP32
    dims: [ {out_dims} ]
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {spec.max_queue_delay_us}
}}
instance_group [
  {{
    count: {spec.instance_count}
    kind: {kind}
  }}
]
"""
