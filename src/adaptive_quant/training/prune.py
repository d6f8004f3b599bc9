"""Structured (channel) pruning of CifarResNet: remove whole filters, giving a narrower dense network.

Channels come in groups that must be cut together: a group is the output channels of one or
more convs (with their BNs) and the input channels of the layers that read them. A stage's
width is one group for the downsampling conv, every residual block's second conv (their
outputs are summed through the skips) and the next stage's first conv (or the classifier);
a residual block's middle, a plain conv's output and a learned stem are groups of their own.
Each group keeps its best-scored channels (in their original order), so the pruned network
is again a CifarResNet, rebuilt from a ModelConfig (widths, inner_widths) and quantizable as
before: the same Conv-BN-ReLU, Conv-BN-add-ReLU and Linear patterns, only narrower.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from adaptive_quant.config import ModelConfig
from adaptive_quant.training.model import CifarResNet, ResidualBlock, build_model
from adaptive_quant.training.whitening import WhiteningStem


@dataclass
class _Group:
    """Channels produced by `producers` (conv, bn) pairs and read by `consumers` (conv or linear)."""

    producers: list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]
    consumers: list[nn.Conv2d | nn.Linear]
    prunable: bool = True
    keep: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


def _groups(model: CifarResNet) -> tuple[_Group, list[_Group], list[list[_Group]]]:
    """(stem group, stage-width group per stage, inner groups per stage) of `model`."""
    first = [stage[0][0] for stage in model.stages]  # each stage's downsampling conv
    if isinstance(model.stem, WhiteningStem):  # fixed filters (± eigenvector pairs): kept whole
        stem = _Group([(model.stem.conv, None)], [first[0]], prunable=False)
    else:
        stem = _Group([(model.stem[0], model.stem[1])], [first[0]])
    widths, inners = [], []
    for i, stage in enumerate(model.stages):
        reader: nn.Conv2d | nn.Linear = first[i + 1] if i < 2 else model.fc
        down, blocks = stage[0], list(stage)[2:]
        inner: list[_Group] = []
        if not blocks or isinstance(blocks[0], ResidualBlock):
            width = _Group([(down[0], down[1])], [reader])
            for b in blocks:
                width.producers.append((b.conv2, b.bn2))
                width.consumers.append(b.conv1[0])
                inner.append(_Group([(b.conv1[0], b.conv1[1])], [b.conv2]))
        else:  # plain: down → p0 → … → p_last; all but p_last's output are inner
            chain = [down, *blocks]
            inner = [_Group([(a[0], a[1])], [b[0]]) for a, b in zip(chain[:-1], chain[1:], strict=True)]
            width = _Group([(chain[-1][0], chain[-1][1])], [reader])
        widths.append(width)
        inners.append(inner)
    return stem, widths, inners


def _scores(group: _Group, criterion: str) -> torch.Tensor:
    """(C,) importance of each channel of the group; producers are summed, each scaled to mean 1."""
    total = torch.zeros(group.producers[0][0].out_channels)
    for conv, bn in group.producers:
        if criterion == "bn":
            s = bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)
        else:
            s = conv.weight.detach().abs().flatten(1).sum(1)
        total += s.float() / s.float().mean().clamp_min(1e-12)
    return total


def _choose(group: _Group, amount: float, criterion: str) -> int:
    n = group.producers[0][0].out_channels
    k = n if not group.prunable else max(1, round(n * (1 - amount)))
    group.keep = torch.sort(torch.topk(_scores(group, criterion), k).indices).values
    return k


@torch.no_grad()
def prune_channels(
    model: CifarResNet, cfg: ModelConfig, amount: float, criterion: str = "l1"
) -> tuple[CifarResNet, ModelConfig]:
    """A copy of `model` with `amount` of the channels of every prunable group removed.

    Returns the pruned network and the ModelConfig that rebuilds it (for checkpoints).
    """
    if criterion == "bn" and not cfg.bn_scale:
        raise ValueError("prune.criterion 'bn' ranks channels by BN scale, but model.bn_scale is false; use 'l1'")
    stem, widths, inners = _groups(model)
    new_widths = [_choose(stem, amount, criterion)] + [_choose(g, amount, criterion) for g in widths]
    new_inner = []
    for i, groups in enumerate(inners):
        counts = {_choose(g, amount, criterion) for g in groups}
        new_inner.append(counts.pop() if counts else new_widths[i + 1])  # one inner width per stage
    # built (so validated) anew rather than model_copy(update=...), which would skip the checks
    new_cfg = ModelConfig(**{**cfg.model_dump(), "widths": new_widths, "inner_widths": new_inner})

    out_keep: dict[nn.Module, torch.Tensor] = {}
    in_keep: dict[nn.Module, torch.Tensor] = {}
    for g in [stem, *widths, *(g for groups in inners for g in groups)]:
        for conv, bn in g.producers:
            out_keep[conv] = g.keep
            if bn is not None:
                out_keep[bn] = g.keep
        for reader in g.consumers:
            in_keep[reader] = g.keep

    pruned = build_model(new_cfg)
    for old, new in zip(model.modules(), pruned.modules(), strict=True):
        if isinstance(old, (nn.Conv2d, nn.Linear)):
            w = old.weight
            if old in out_keep:
                w = w[out_keep[old]]
            if old in in_keep:
                w = w[:, in_keep[old]]
            new.weight.copy_(w)
            if old.bias is not None:
                new.bias.copy_(old.bias[out_keep[old]] if old in out_keep else old.bias)
        elif isinstance(old, nn.BatchNorm2d):
            keep = out_keep[old]
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(new, name).copy_(getattr(old, name)[keep])
            new.num_batches_tracked.copy_(old.num_batches_tracked)
    return pruned.eval(), new_cfg
