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
# ITU-R BT.601 luma weights, for uint8 RGB → luminance
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
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
    """(N, H, W, 3) uint8 → (N, NUM_FEATURES) float32; pixel-scale features on a 0..1 scale."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {images.shape}")
    n, h, w, _ = images.shape
    x = images.astype(np.float32) * (1.0 / 255.0)  # (N, H, W, 3)
    thumb = x.reshape(n, THUMB, h // THUMB, THUMB, w // THUMB, 3).mean(axis=(2, 4)).reshape(n, -1)
    flat = x.reshape(n, h * w, 3)
    mean = flat.mean(axis=1)  # (N, 3)
    std = flat.std(axis=1)
    luma = x @ _LUMA  # (N, H, W)
    lflat = luma.reshape(n, -1)
    lsorted = np.sort(lflat, axis=1)
    p5, p95 = lsorted[:, int(0.05 * h * w)], lsorted[:, int(0.95 * h * w) - 1]
    clipped = ((lflat < 0.02) | (lflat > 0.98)).mean(axis=1)
    gx = np.abs(np.diff(luma, axis=2))  # (N, H, W-1)
    gy = np.abs(np.diff(luma, axis=1))  # (N, H-1, W)
    strong = ((gx > 0.1).mean(axis=(1, 2)) + (gy > 0.1).mean(axis=(1, 2))) * 0.5
    q = h // 4
    centre = gx[:, q : h - q, q : w - q - 1].mean(axis=(1, 2))
    overall = gx.mean(axis=(1, 2))
    # 16-bin luminance histogram entropy (bits), via one bincount over offset bin ids
    bins = np.minimum((lflat * 16).astype(np.int64), 15) + 16 * np.arange(n)[:, None]
    hist = np.bincount(bins.ravel(), minlength=16 * n).reshape(n, 16) / float(h * w)
    entropy = -(hist * np.log2(np.where(hist > 0, hist, 1.0))).sum(axis=1)
    feats = np.concatenate(
        [
            thumb,
            mean,
            std,
            lflat.std(axis=1, keepdims=True),
            (p95 - p5)[:, None],
            clipped[:, None],
            overall[:, None],
            gy.mean(axis=(1, 2))[:, None],
            strong[:, None],
            (centre / (overall + 1e-6))[:, None],
            entropy[:, None],
        ],
        axis=1,
    )
    return feats.astype(np.float32, copy=False)
