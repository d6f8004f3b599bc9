"""Image bytes: PNG encoding shared by the clients, the gateway's warm-up and the tests (Pillow only)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 → PNG bytes (used for sample requests, warm-up calls and tests)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
