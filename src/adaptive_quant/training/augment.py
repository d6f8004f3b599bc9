"""Tensor-side preprocessing and augmentation (no torchvision: it does not import here).

Everything works on whole batches of uint8 images at once, which on 2 cores costs a few
percent of a training step, against tens of percent for per-image PIL transforms.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from adaptive_quant.config import AugmentConfig
from adaptive_quant.data import CIFAR10_MEAN, CIFAR10_STD


def to_normalized_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32, normalised with the CIFAR-10 mean/std."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Reflection-pad by `padding` px, then take a random same-size crop per image. x: (N, C, H, W)."""
    if padding == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    # gather rows then columns with index tensors: one vectorised op instead of N slices
    rows = dy[:, None] + torch.arange(h)[None, :]  # (N, H)
    cols = dx[:, None] + torch.arange(w)[None, :]  # (N, W)
    idx_n = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Flip horizontally the images where `mask` (N,) is true; a random half when no mask is given."""
    if mask is None:
        mask = torch.rand(x.shape[0], generator=generator) < 0.5
    x = x.clone()
    x[mask] = x[mask].flip(3)
    return x


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a random size×size square per image (centre anywhere, clipped at the border)."""
    if size == 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=generator)
    cx = torch.randint(0, w, (n,), generator=generator)
    ys = torch.arange(h)[None, :]
    xs = torch.arange(w)[None, :]
    in_y = (ys >= (cy - size // 2)[:, None]) & (ys < (cy - size // 2 + size)[:, None])  # (N, H)
    in_x = (xs >= (cx - size // 2)[:, None]) & (xs < (cx - size // 2 + size)[:, None])  # (N, W)
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (N, 1, H, W)
    return x.masked_fill(mask, 0.0)


def pixel_noise(x: torch.Tensor, max_std: float, share: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian pixel noise on a random `share` of a normalised batch, σ ~ U(0, max_std) grey levels
    per image (0..255 scale, converted with each channel's std). max_std 0 returns x unchanged."""
    if max_std == 0 or share == 0:
        return x
    n = x.shape[0]
    sigma = torch.rand(n, generator=generator) * max_std * (torch.rand(n, generator=generator) < share)
    per_channel = torch.tensor(CIFAR10_STD, dtype=x.dtype).view(1, 3, 1, 1) * 255.0  # grey levels per unit
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x + noise * (sigma.view(n, 1, 1, 1).to(x.dtype) / per_channel)


def alternating_flip_mask(
    n: int, epoch: int, generator: torch.Generator, base: torch.Tensor | None = None
) -> torch.Tensor:
    """(n,) bool: which images to flip in `epoch` (airbench). `base` is epoch 0's random half
    (drawn here when None); odd epochs flip exactly the others, so each image alternates."""
    if base is None:
        base = torch.rand(n, generator=generator) < 0.5
    return base if epoch % 2 == 0 else ~base


def augment_batch(
    x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator, flip_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Training augmentation on a normalised batch: padded random crop, flip, cutout, pixel noise.

    flip_mask: (N,) bool, which images to flip (alternating flips); None flips a random half.
    """
    x = random_crop(x, cfg.crop_padding, generator)
    if cfg.flip:
        x = random_flip(x, generator, flip_mask)
    x = cutout(x, cfg.cutout, generator)
    return pixel_noise(x, cfg.noise_std, cfg.noise_share, generator)
