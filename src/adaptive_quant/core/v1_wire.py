"""The v1 wire format of a classify request: what a caller sends to POST /v1/classify.

A contract, like the manifest: the clients (`tools/client.py`, the load tester, `aq-predict`) and
the evaluation's --url mode build their requests here, so they all speak what the gateway parses.
  body     {"instances": [{"b64": PNG, base64}, ...]} (the gateway also takes {"pixels": H×W×3})
  headers  X-Latency-Budget-Ms (ms), X-Priority (quality | balanced | speed), X-Min-Precision
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from adaptive_quant.core.images import encode_png

CLASSIFY_PATH = "/v1/classify"
BUDGET_HEADER = "X-Latency-Budget-Ms"
PRIORITY_HEADER = "X-Priority"
MIN_PRECISION_HEADER = "X-Min-Precision"


def request_body(images: np.ndarray) -> dict[str, Any]:
    """(N, H, W, 3) uint8 → {"instances": [{"b64": PNG}, ...]}."""
    return {"instances": [{"b64": base64.b64encode(encode_png(im)).decode()} for im in images]}


def headers_for(budget_ms: float | None, priority: str | None, min_precision: str | None) -> dict[str, str]:
    """The routing headers of one request; an option left None is not sent (the gateway's default)."""
    h = {}
    if budget_ms is not None:
        h[BUDGET_HEADER] = f"{budget_ms:g}"
    if priority:
        h[PRIORITY_HEADER] = priority
    if min_precision:
        h[MIN_PRECISION_HEADER] = min_precision
    return h
