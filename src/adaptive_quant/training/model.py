"""The classifier: a CIFAR ResNet (ResNet-9 family) built from Conv-BN-ReLU blocks.

Every convolution is followed by BatchNorm and (except before a residual add) ReLU, the
patterns the X86 inductor quantizer fuses: conv-bn-relu, conv-bn-add-relu, linear.
Shape of the input: (N, 3, 32, 32), already normalised; output: logits (N, num_classes).
"""

from __future__ import annotations

import torch
from torch import nn

from adaptive_quant.config import ModelConfig
from adaptive_quant.training.whitening import WhiteningStem


def batch_norm(channels: int, momentum: float = 0.1, learn_scale: bool = True) -> nn.BatchNorm2d:
    """BN whose scale is learned, or fixed at 1 (still a parameter, so conv-bn folding is unchanged)."""
    bn = nn.BatchNorm2d(channels, momentum=momentum)
    bn.weight.requires_grad_(learn_scale)
    return bn


def conv_bn_relu(c_in: int, c_out: int, momentum: float = 0.1, learn_scale: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),  # bias is redundant before BN
        batch_norm(c_out, momentum, learn_scale),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """x → relu(bn(conv(relu(bn(conv(x))))) + x): the basic ResNet block, same width in and out.

    inner: channels between the two convs (default: `channels`; fewer after channel pruning).
    """

    def __init__(self, channels: int, momentum: float = 0.1, learn_scale: bool = True, inner: int = 0) -> None:
        super().__init__()
        inner = inner or channels
        self.conv1 = conv_bn_relu(channels, inner, momentum, learn_scale)
        self.conv2 = nn.Conv2d(inner, channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = batch_norm(channels, momentum, learn_scale)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.conv1(x))) + x)


class CifarResNet(nn.Module):
    """stem → 3 × [conv-bn-relu (widen) → maxpool/2 → residual blocks] → global max pool → linear.

    With widths (64, 128, 256, 512) and blocks (1, 0, 1) this is the DAWNBench ResNet-9; the
    default (32, 64, 128, 256), (1, 1, 1) spends a quarter of its compute per block, which is
    what two CPU cores can train in under an hour. With stem "whiten", block "plain", blocks
    (1, 1, 1) and widths (24, 64, 256, 256) it is airbench94's network, with ReLU for GELU and
    BN before the pool (conv-bn-relu is the pattern the INT8 quantizer fuses; BN after a pool is not).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w, bn = cfg.widths, {"momentum": cfg.bn_momentum, "learn_scale": cfg.bn_scale}
        # 32×32 (conv) or (33-k)×(33-k) (whiten: no padding)
        self.stem = WhiteningStem(w[0], cfg.whiten_kernel) if cfg.stem == "whiten" else conv_bn_relu(3, w[0], **bn)
        stages = []
        for i in range(3):
            out, n = w[i + 1], cfg.blocks[i]
            inner = cfg.inner_widths[i] if cfg.inner_widths else out
            if cfg.block == "residual" or n == 0:  # the downsampling conv feeds the skips: stage width
                layers: list[nn.Module] = [conv_bn_relu(w[i], out, **bn), nn.MaxPool2d(2)]  # 16, 8, 4 px
                layers += [ResidualBlock(out, **bn, inner=inner) for _ in range(n)]
            else:  # plain: every conv but the stage's last one is inner
                layers = [conv_bn_relu(w[i], inner, **bn), nn.MaxPool2d(2)]
                layers += [conv_bn_relu(inner, inner if j < n - 1 else out, **bn) for j in range(n)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(w[3], cfg.num_classes)
        self.head_scale = cfg.head_scale
        if cfg.dirac_init:
            self._dirac_init()

    @torch.no_grad()
    def _dirac_init(self) -> None:
        """The first c_in filters of every 3×3 conv pass their input channel through (airbench)."""
        for m in self.stages.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.dirac_(m.weight[: min(m.in_channels, m.out_channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = torch.flatten(self.pool(x), 1)  # (N, C)
        return self.fc(x) * self.head_scale


def build_model(cfg: ModelConfig) -> CifarResNet:
    return CifarResNet(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
