"""The classifier: a CIFAR ResNet (ResNet-9 family) built from Conv-BN-ReLU blocks.

Every convolution is followed by BatchNorm and (except before a residual add) ReLU, the
patterns the X86 inductor quantizer fuses: conv-bn-relu, conv-bn-add-relu, linear.
Shape of the input: (N, 3, 32, 32), already normalised; output: logits (N, num_classes).
"""

from __future__ import annotations

import torch
from torch import nn

from adaptive_quant.config import ModelConfig


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),  # bias is redundant before BN
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """x → relu(bn(conv(relu(bn(conv(x))))) + x): the basic ResNet block, same width in and out."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.conv1(x))) + x)


class CifarResNet(nn.Module):
    """stem → 3 × [conv-bn-relu (widen) → maxpool/2 → residual blocks] → global max pool → linear.

    With widths (64, 128, 256, 512) and blocks (1, 0, 1) this is the DAWNBench ResNet-9; the
    default (32, 64, 128, 256), (1, 1, 1) spends a quarter of its compute per block, which is
    what two CPU cores can train in under an hour.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w = cfg.widths
        self.stem = conv_bn_relu(3, w[0])  # 32×32
        stages = []
        for i in range(3):
            layers: list[nn.Module] = [conv_bn_relu(w[i], w[i + 1]), nn.MaxPool2d(2)]  # 16, 8, 4 px
            layers += [ResidualBlock(w[i + 1]) for _ in range(cfg.blocks[i])]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(w[3], cfg.num_classes)
        self.head_scale = cfg.head_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = torch.flatten(self.pool(x), 1)  # (N, C)
        return self.fc(x) * self.head_scale


def build_model(cfg: ModelConfig) -> CifarResNet:
    return CifarResNet(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
