"""Exponential moving average of model weights, with the originals' decay schedules.

- "ramp" (condlora's default): decay min(d, (1 + n) / (10 + n)) after n updates, so short runs
  are not dominated by the initial weights.
- "fixed": decay d at every update (improved-diffusion's rate 0.9999).
- "edm": EDM's half-life in samples, beta = 0.5 ** (batch / max(h, 1e-8)) with
  h = min(halflife, samples_seen * rampup) (EDM's training loop, ema_rampup_ratio).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from condlora.core.errors import ConfigError
from condlora.train.config import EMA_SCHEDULES


class EMA:
    """Keeps an averaged copy of a model; `decay_at(step)` follows the configured schedule."""

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        schedule: str = "ramp",
        batch_size: int = 1,
        halflife_kimg: float = 500.0,
        rampup: float = 0.05,
    ) -> None:
        if schedule not in EMA_SCHEDULES:
            valid = ", ".join(EMA_SCHEDULES)
            raise ConfigError(f"unknown train.ema_schedule {schedule!r}; valid: {valid}")
        self.decay, self.schedule = decay, schedule
        self.batch_size, self.halflife_kimg, self.rampup = batch_size, halflife_kimg, rampup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """Decay of the update that ends optimizer step `step` (1 for the first step)."""
        if self.schedule == "fixed":
            return self.decay
        if self.schedule == "ramp":
            return min(self.decay, (1 + step) / (10 + step))
        seen = (step - 1) * self.batch_size  # EDM updates before counting this step's batch
        halflife = self.halflife_kimg * 1000
        if self.rampup > 0:
            halflife = min(halflife, seen * self.rampup)
        return 0.5 ** (self.batch_size / max(halflife, 1e-8))

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
