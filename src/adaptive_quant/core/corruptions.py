"""Corrupted copies of a split, for routing under distribution shift. NumPy and Pillow, seeded.

Five corruptions of moderate severity, each applied to every image (N, H, W, 3) uint8:
  noise       additive Gaussian noise, σ = 20/255 of the range
  blur        Gaussian blur, radius 1 px (a 32 px image loses its finest texture)
  contrast    pixel values pulled halfway towards each image's mean
  jpeg        re-encoded at quality 20 (the data already is JPEG at a higher quality)
  brightness  +60/255, clipped
Every stage may use them (pure image transforms): the export gate's shift check refuses a network
that breaks under them, and the evaluation measures whether the router still pays, and stays
calibrated, when the inputs drift.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter


def _noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x.astype(np.float32) + rng.normal(0.0, 20.0, x.shape), 0, 255).astype(np.uint8)


def _per_image(x: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(fn(Image.fromarray(im)).convert("RGB")) for im in x])


def _blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _per_image(x, lambda im: im.filter(ImageFilter.GaussianBlur(radius=1.0)))


def _contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f = x.astype(np.float32)
    mean = f.mean(axis=(1, 2, 3), keepdims=True)
    return np.clip(mean + 0.5 * (f - mean), 0, 255).astype(np.uint8)


def _jpeg(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    def encode(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=20)
        buf.seek(0)
        return Image.open(buf)

    return _per_image(x, encode)


def _brightness(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x.astype(np.int16) + 60, 0, 255).astype(np.uint8)


CORRUPTIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "noise": _noise,
    "blur": _blur,
    "contrast": _contrast,
    "jpeg": _jpeg,
    "brightness": _brightness,
}


def corrupt(images: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """(N, H, W, 3) uint8 → the same images under corruption `name` (seeded)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; accepted: {', '.join(CORRUPTIONS)}")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    return CORRUPTIONS[name](images, np.random.default_rng(seed))
