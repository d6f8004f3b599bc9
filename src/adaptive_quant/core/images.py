"""Images: PNG encoding (clients, the gateway's warm-up, tests) and the model input every stage feeds the variants."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 → PNG bytes (used for sample requests, warm-up calls and tests)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def to_model_input(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32, scaled to 0..1 and normalised per channel."""
    scale = np.asarray(std, dtype=np.float32) * 255.0  # (3,) uint8 units per std
    shift = np.asarray(mean, dtype=np.float32) * 255.0
    x = (images.astype(np.float32) - shift) / scale  # (N, H, W, 3)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
