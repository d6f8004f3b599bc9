"""airbench's whitening stem: a fixed conv whose filters whiten the training images' small patches.

Each k×k×3 patch (a 3·k² vector) is projected onto the eigenvectors of the patch covariance,
each divided by sqrt(eigenvalue + eps), so the outputs are decorrelated with unit variance on
the training patches. Keeping both +v and -v of each eigenvector before the ReLU loses no
information. The first layer then never has to learn this, which is worth several epochs.
"""

from __future__ import annotations

import torch
from torch import nn


def image_patches(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """(N, C, H, W) → every k×k patch (stride 1, no padding), as (N·(H-k+1)·(W-k+1), C, k, k)."""
    c = x.shape[1]
    return x.unfold(2, kernel, 1).unfold(3, kernel, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c, kernel, kernel)


def whitening_filters(patches: torch.Tensor, eps: float) -> torch.Tensor:
    """Patches (P, C, k, k) → (C·k², C, k, k) filters: eigenvectors of the (uncentred) covariance,
    largest eigenvalue first, each scaled by 1/sqrt(eigenvalue + eps)."""
    p, c, h, w = patches.shape
    flat = patches.reshape(p, -1).double()
    cov = flat.T @ flat / p  # (C·k², C·k²)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    filters = eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]
    return filters.reshape(c * h * w, c, h, w).float()


class WhiteningStem(nn.Module):
    """Fixed whitening conv (weights not trained) with a learned bias, then ReLU: conv-relu for the quantizer."""

    def __init__(self, out_channels: int, kernel: int = 2, in_channels: int = 3) -> None:
        super().__init__()
        if out_channels % 2 or out_channels > 2 * in_channels * kernel * kernel:
            raise ValueError(
                f"whitening stem: out_channels must be even and <= {2 * in_channels * kernel * kernel}, "
                f"got {out_channels}"
            )
        self.kernel = kernel
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=kernel, padding=0, bias=True)
        self.conv.weight.requires_grad_(False)
        nn.init.zeros_(self.conv.bias)
        self.relu = nn.ReLU(inplace=True)

    @torch.no_grad()
    def fit(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the filters from normalised training images (N, 3, H, W): ± the leading eigenvectors."""
        filters = whitening_filters(image_patches(images.float(), self.kernel), eps)
        half = self.conv.out_channels // 2
        self.conv.weight.copy_(torch.cat([filters[:half], -filters[:half]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))
