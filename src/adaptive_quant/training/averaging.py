"""Lookahead weight averaging (airbench): an EMA of the weights that the live weights are reset to.

Every `every` optimizer steps the average moves towards the live weights, ema ← ema + (1-d)·(w - ema),
and the live weights are then replaced by it. The decay d grows as 0.95^5·(step/total)^3: no
averaging early, when the weights must move fast, and strong averaging at the end of the
schedule, where it plays the role of a slower lr decay. BN running statistics are averaged too.
"""

from __future__ import annotations

import torch
from torch import nn


class Lookahead:
    def __init__(self, model: nn.Module, total_steps: int, every: int = 5) -> None:
        if every < 1:
            raise ValueError(f"lookahead: every must be >= 1 step, got {every}")
        self.every = every
        self.total_steps = max(1, total_steps)
        self.step_count = 0
        # float tensors only: num_batches_tracked (int64) is not an average of anything
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def decay(self, step: int) -> float:
        return 0.95**5 * (min(step, self.total_steps) / self.total_steps) ** 3

    @torch.no_grad()
    def sync(self, model: nn.Module, decay: float | None = None) -> None:
        """Pull the average towards the live weights by (1 - decay), then copy it into the model."""
        d = self.decay(self.step_count) if decay is None else decay
        for k, v in model.state_dict().items():
            if k in self.average:
                avg = self.average[k]
                avg.lerp_(v.detach().to(avg.dtype), 1.0 - d)
                v.copy_(avg)

    def after_step(self, model: nn.Module) -> None:
        """Call after every optimizer step."""
        self.step_count += 1
        if self.step_count % self.every == 0:
            self.sync(model)
