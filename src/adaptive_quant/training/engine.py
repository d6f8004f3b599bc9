"""Training and evaluation loops, as plain functions (pytorch/vision references style)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adaptive_quant.config import AugmentConfig
from adaptive_quant.data import Split
from adaptive_quant.training.augment import augment_batch, to_normalized_tensor


@dataclass
class EpochStats:
    loss: float
    accuracy: float  # share of training samples classified right (on augmented images)
    lr: float  # learning rate at the end of the epoch
    seconds: float
    images_per_s: float


@dataclass
class EvalStats:
    loss: float
    accuracy: float
    logits: np.ndarray  # (N, num_classes) float32


def one_cycle(
    total_steps: int, warmup_fraction: float, start_factor: float = 0.0, end_factor: float = 0.0
) -> Callable[[int], float]:
    """lr multiplier: linear start → 1 over the warm-up, then linear 1 → end (ResNet-9/airbench schedule).

    start_factor = end_factor = 0 is the classic triangle; airbench94 uses 0.2 → 1 → 0.07.
    """
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return start_factor + (1.0 - start_factor) * (step + 1) / warmup
        frac = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 + (end_factor - 1.0) * frac

    return factor


def cosine(total_steps: int) -> Callable[[int], float]:
    """lr multiplier: half a cosine from 1 to 0 (QAT fine-tuning starts at its peak)."""
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def make_optimizer(
    model: nn.Module,
    lr: float,
    momentum: float,
    weight_decay: float,
    bn_lr_scale: float = 1.0,
    bn_weight_decay: float = 0.0,
) -> torch.optim.SGD:
    """Nesterov SGD; no weight decay on BN parameters and biases (they set scale, not capacity).

    BatchNorm parameters train at lr · bn_lr_scale with their own decay (default none). Parameters with requires_grad false (a fixed
    whitening conv, fixed BN scales) are still handed over, so freezing and unfreezing them later
    needs no new optimizer (SGD skips parameters without a gradient).
    """
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    decay, no_decay, bn = [], [], []
    for p in model.parameters():
        if id(p) in bn_params:
            bn.append(p)
        else:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": bn, "weight_decay": bn_weight_decay, "lr": lr * bn_lr_scale},
    ]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=momentum, nesterov=True)


def steps_per_epoch(n: int, batch_size: int, max_steps: int = 0) -> int:
    steps = n // batch_size  # drop the last partial batch: BN statistics of a tiny batch are noise
    steps = max(1, steps)
    return min(steps, max_steps) if max_steps else steps


def train_one_epoch(
    model: nn.Module,
    data: Split,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    augment: AugmentConfig,
    batch_size: int,
    generator: torch.Generator,
    label_smoothing: float = 0.0,
    bf16: bool = False,
    channels_last: bool = False,
    max_steps: int = 0,
    desc: str = "train",
    flip_mask: torch.Tensor | None = None,
    after_step: Callable[[], None] | None = None,
) -> EpochStats:
    """One pass over shuffled `data`; images are normalised and augmented per batch, as tensors.

    flip_mask: (len(data),) bool, which images to flip this epoch (alternating flips), instead of
    flipping at random. after_step: called after every optimizer step (weight averaging).
    """
    if not isinstance(model, torch.fx.GraphModule):
        model.train()  # exported (QAT) graphs are switched by quantize.set_qat_mode instead
    n_steps = steps_per_epoch(len(data), batch_size, max_steps)
    order = torch.randperm(len(data), generator=generator)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(range(n_steps), desc=desc, leave=False, unit="batch", dynamic_ncols=True)
    for step in bar:
        idx = order[step * batch_size : (step + 1) * batch_size]
        x = augment_batch(
            to_normalized_tensor(images[idx]), augment, generator, None if flip_mask is None else flip_mask[idx]
        )
        y = labels[idx]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step()
        total_loss += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    seconds = time.perf_counter() - start
    return EpochStats(
        loss=total_loss / seen,
        accuracy=correct / seen,
        lr=optimizer.param_groups[0]["lr"],
        seconds=seconds,
        images_per_s=seen / seconds,
    )


@torch.no_grad()
def predict_logits(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    batch_size: int = 1000,
    bf16: bool = False,
    channels_last: bool = False,
) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, num_classes) float32 logits; the model must already be in eval mode."""
    out = []
    for i in range(0, len(images), batch_size):
        x = to_normalized_tensor(images[i : i + batch_size])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(model(x).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def evaluate(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    data: Split,
    batch_size: int = 1000,
    bf16: bool = False,
    channels_last: bool = False,
) -> EvalStats:
    """Accuracy and plain cross-entropy (no smoothing) on `data`, no augmentation."""
    if isinstance(model, nn.Module) and not isinstance(model, torch.fx.GraphModule):
        model.eval()
    logits = predict_logits(model, data.images, batch_size, bf16, channels_last)
    labels = torch.from_numpy(data.labels)
    t = torch.from_numpy(logits)
    loss = float(F.cross_entropy(t, labels)) if len(labels) else float("nan")
    acc = float((t.argmax(1) == labels).float().mean()) if len(labels) else float("nan")
    return EvalStats(loss=loss, accuracy=acc, logits=logits)
