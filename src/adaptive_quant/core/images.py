"""Images: PNG encoding (clients, the gateway's warm-up, tests) and the model input every stage feeds the variants."""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 → PNG bytes (used for sample requests, warm-up calls and tests)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def to_model_input(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32, scaled to 0..1 and normalised per channel.

    One copy into the NCHW float array, then normalised in place (a cast followed by a normalising
    copy took three to six times as long), bit for bit the same as (x − mean·255) / (std·255)."""
    n, h, w, c = images.shape
    shift, scale = _channel_constants(tuple(mean), tuple(std))
    x = np.empty((n, c, h, w), dtype=np.float32)
    np.copyto(x, images.transpose(0, 3, 1, 2))  # the uint8 → float32 cast happens in the copy
    x -= shift
    x /= scale
    return x


@functools.lru_cache(maxsize=8)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(1, C, 1, 1) float32 mean·255 and std·255, in uint8 units: computed once per normalisation."""
    shift = (np.asarray(mean, dtype=np.float32) * 255.0).reshape(1, -1, 1, 1)
    scale = (np.asarray(std, dtype=np.float32) * 255.0).reshape(1, -1, 1, 1)
    shift.setflags(write=False)
    scale.setflags(write=False)
    return shift, scale
