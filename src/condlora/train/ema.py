"""Exponential moving average of model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps an averaged copy of a model; decay ramps up as (1 + n) / (10 + n) early on."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """Effective decay after `step` updates (short runs are not dominated by the init)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """ema <- decay * ema + (1 - decay) * model; buffers are copied."""
        weight = 1.0 - self.decay_at(step)
        ema_params = list(self.model.parameters())
        params = [
            p.detach().to(e.dtype) for e, p in zip(ema_params, model.parameters(), strict=True)
        ]
        torch._foreach_lerp_(ema_params, params, weight)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)
