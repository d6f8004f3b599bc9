"""config.pbtxt text for one Triton model (pure: no I/O).

Two flavours over the same ONNX file:
- "onnxruntime": the production one, for NVIDIA's Triton container (ONNX Runtime backend).
- "python": a Python-backend model whose model.py runs ONNX Runtime, for the Triton binary that
  nvidia-pytriton ships (it has no onnxruntime backend).

Which versions (`<name>/<N>/`) Triton keeps loaded is the config's `version_policy`; the roll-out edits
that one entry in place (with_version_policy), so every other line of either flavour is kept.
"""

from __future__ import annotations

import re
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


def policy_line(versions: list[int]) -> str:
    return f"version_policy: {{ specific: {{ versions: [ {', '.join(str(v) for v in sorted(versions))} ] }} }}"


def _policy_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the top-level `version_policy ... { ... }` entry, braces balanced; None if absent."""
    m = re.search(r"(?m)^[ \t]*version_policy\b[^{\n]*\{", text)
    if m is None:
        return None
    depth, i = 1, m.end()
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    if depth:
        raise ValueError("config.pbtxt has a version_policy whose braces do not close")
    if i < len(text) and text[i] == "\n":
        i += 1
    return m.start(), i


def with_version_policy(text: str, versions: list[int]) -> str:
    """config.pbtxt text with its version_policy set to `versions` (replaced, or appended); the rest kept."""
    if not versions:
        raise ValueError("a version policy needs at least one version")
    line = policy_line(versions) + "\n"
    span = _policy_span(text)
    if span is not None:
        return text[: span[0]] + line + text[span[1] :]
    return text + ("" if text.endswith("\n") or not text else "\n") + line


def policy_versions(text: str) -> list[int] | None:
    """The versions a config.pbtxt's `specific` policy names; None without a policy."""
    span = _policy_span(text)
    if span is None:
        return None
    m = re.search(r"versions\s*:\s*\[([^\]]*)\]", text[span[0] : span[1]])
    return [] if m is None else [int(v) for v in m.group(1).replace(",", " ").split()]
