"""Cheap per-sample features for the accuracy predictor. NumPy only, pure, batched.

The predictor must decide *before* any classifier runs, so its inputs are statistics a CPU
computes in microseconds from the decoded image (uint8, (N, 32, 32, 3)). What and why:

- thumbnail (4×4×3 = 48): coarse layout and colour; sky/water backgrounds, centred objects and
  uniform scenes are easy, cluttered ones hard.
- colour (6): per-channel mean and std; saturation-poor (grey) images lose a cue the net uses.
- contrast (3): luminance std, p5–p95 range, share of clipped pixels: low contrast and
  over-exposure are where quantization noise matters most relative to the signal.
- edges (4): mean |∂x| and |∂y|, strong-edge share, centre-vs-border edge ratio: texture and
  clutter (hard) against smooth, object-in-the-middle images (easy).
- histogram entropy (1) of the luminance: flat, low-information images are ambiguous.

The same function runs in training and in the gateway: no train/serve skew by construction.
"""

from __future__ import annotations

import numpy as np

THUMB = 4  # thumbnail side, px
# ITU-R BT.601 luma weights, for RGB → luminance
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_EDGE = 0.1 * 255  # a luminance step above this (grey levels) counts as a strong edge
_BINS = 16  # luminance histogram bins
FEATURE_NAMES: list[str] = (
    [f"thumb_{y}_{x}_{c}" for y in range(THUMB) for x in range(THUMB) for c in "rgb"]
    + ["mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b"]
    + ["luma_std", "luma_range", "clipped_share"]
    + ["grad_x", "grad_y", "strong_edge_share", "centre_edge_ratio"]
    + ["luma_entropy"]
)
NUM_FEATURES = len(FEATURE_NAMES)
FEATURE_VERSION = 1


def compute_features(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, NUM_FEATURES) float32; pixel-scale features on a 0..1 scale.

    Written for one image as much as for many: about 30 NumPy calls whatever N, no sort and no
    per-image Python loop, because the gateway computes it per request on the hot path.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {images.shape}")
    n, h, w, _ = images.shape
    hw = float(h * w)
    x = images.astype(np.float32)  # (N, H, W, 3), grey levels 0..255
    thumb = x.reshape(n, THUMB, h // THUMB, THUMB, w // THUMB, 3).mean(axis=(2, 4)).reshape(n, THUMB * THUMB, 3)
    mean = thumb.mean(axis=1)  # (N, 3): equal-size cells, so the mean of cell means is the image mean
    sq = (x * x).reshape(n, -1, 3).mean(axis=1)
    std = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    luma = x @ _LUMA  # (N, H, W)
    l_mean = mean @ _LUMA
    l_std = np.sqrt(np.maximum((luma * luma).reshape(n, -1).mean(axis=1) - l_mean * l_mean, 0.0))
    # one histogram for all N images: offset each image's bin ids by 16·i, one bincount
    ids = (luma.reshape(n, -1) * (_BINS / 256.0)).astype(np.int64) + (_BINS * np.arange(n))[:, None]
    hist = np.bincount(ids.ravel(), minlength=_BINS * n).reshape(n, _BINS) / hw  # (N, 16) shares
    cdf = np.cumsum(hist, axis=1)
    # p5..p95 range in bins (resolution 1/16 of the scale): cheaper than a sort, and enough here
    l_range = ((cdf < 0.95).sum(axis=1) - (cdf < 0.05).sum(axis=1)) * (1.0 / _BINS)
    clipped = hist[:, 0] + hist[:, -1]  # share of pixels in the darkest and brightest bins
    entropy = -(hist * np.log2(hist + 1e-12)).sum(axis=1)
    gx = np.abs(np.diff(luma, axis=2))  # (N, H, W-1)
    gy = np.abs(np.diff(luma, axis=1))  # (N, H-1, W)
    gx_mean = gx.mean(axis=(1, 2))
    strong = ((gx > _EDGE).mean(axis=(1, 2)) + (gy > _EDGE).mean(axis=(1, 2))) * 0.5
    q = h // 4
    centre = gx[:, q : h - q, q : w - q - 1].mean(axis=(1, 2))
    out = np.empty((n, NUM_FEATURES), dtype=np.float32)
    out[:, :48] = thumb.reshape(n, -1) * (1 / 255.0)
    out[:, 48:51] = mean * (1 / 255.0)
    out[:, 51:54] = std * (1 / 255.0)
    out[:, 54] = l_std * (1 / 255.0)
    out[:, 55] = l_range
    out[:, 56] = clipped
    out[:, 57] = gx_mean * (1 / 255.0)
    out[:, 58] = gy.mean(axis=(1, 2)) * (1 / 255.0)
    out[:, 59] = strong
    out[:, 60] = centre / (gx_mean + 1e-3)
    out[:, 61] = entropy
    return out
