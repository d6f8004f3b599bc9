"""The load tester's Open Inference Protocol (KServe v2) requests and answers, in the binary
tensor extension, the encoding tritonclient uses by default: an FP32 `images` tensor in, the
`logits`, `passes` and `precision` tensors out. Bodies are built once, up front, like the
/v1/classify ones, so the client's CPU per request stays what sending bytes costs."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from adaptive_quant.core.images import to_model_input

INFER_PATH = "/v2/models/{model}/infer"


def request_body(images: np.ndarray, mean: list[float], std: list[float]) -> tuple[bytes, int]:
    """(N, H, W, 3) uint8 → the body (JSON header + raw FP32 tensor) and the header's length
    (the Inference-Header-Content-Length value)."""
    x = to_model_input(images, mean, std)
    raw = x.astype("<f4").tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        },
        separators=(",", ":"),
    ).encode()
    return head + raw, len(head)


def parse_answer(headers: dict[str, str], body: bytes) -> tuple[list[int], list[str], bool]:
    """A binary v2 answer → (class id per sample, entry variant per sample, budget met).
    Raises ValueError (or KeyError) when the answer is not what the gateway sends."""
    n = int(headers["inference-header-content-length"])
    head: dict[str, Any] = json.loads(body[:n])
    offset, blobs = n, {}
    for out in head["outputs"]:
        size = int(out["parameters"]["binary_data_size"])
        blobs[out["name"]] = (out, body[offset : offset + size])
        offset += size
    out, blob = blobs["logits"]
    logits = np.frombuffer(blob, dtype="<f4").reshape(out["shape"])
    passes = _strings(blobs["passes"][1])
    if len(passes) != len(logits):
        raise ValueError(f"{len(passes)} passes for {len(logits)} samples")
    variants = [p.split(",", 1)[0] for p in passes]
    return logits.argmax(axis=1).tolist(), variants, bool(head["parameters"]["budget_met"])


def _strings(blob: bytes) -> list[str]:
    """BYTES elements: a 4-byte little-endian length, then the bytes, each."""
    out, i = [], 0
    while i < len(blob):
        (k,) = struct.unpack_from("<I", blob, i)
        out.append(blob[i + 4 : i + 4 + k].decode())
        i += 4 + k
    return out
