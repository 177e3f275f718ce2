"""A condlora conditional LoRA inside any diffusers pipeline: `callback_on_step_end`.

    from condlora.lora.diffusers_callback import ConditionalLoRA

    lora = ConditionalLoRA(pipe.unet, "condlora_lora.safetensors")  # `condlora lora schedule`
    lora.start(pipe, num_inference_steps=30)                         # the first step's condition
    pipe(..., num_inference_steps=30, callback_on_step_end=lora.callback_on_step_end)

The file's LoRA is injected into the pipeline's denoiser (its module names: `condlora lora
schedule` writes them so). Before each step the wrappers get the step's noise level
t = timestep / (T - 1) (T: the scheduler's num_train_timesteps) and, for class methods,
`label`; UC-LoRA reads the U-Net's own time embedding in every call, as in training. The
batch of a step shares its condition, so every wrapped layer applies W + dW(t) as one
merged weight (condlora.lora.layer): the LoRA costs one small matmul per layer and step.
Pipelines that take no callbacks (DDPMPipeline, DDIMPipeline in diffusers 0.42): call
`follow_timesteps()` once instead, which sets t from the timestep of every denoiser call.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from condlora.lora.io import load_lora
from condlora.lora.runtime import set_condition


class ConditionalLoRA:
    """A condlora LoRA file loaded into a diffusers denoiser, driven step by step."""

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike,
        label: int | None = None,
        num_train_timesteps: int | None = None,
    ) -> None:
        self.model = model
        self.names = load_lora(model, path)
        self.label = label
        self.num_train_timesteps = num_train_timesteps

    def set_timestep(self, timestep: Tensor | float) -> None:
        """The condition of a denoiser call at this diffusers timestep."""
        steps = self.num_train_timesteps
        if steps is None:
            raise ValueError("num_train_timesteps is unknown: pass it, or call start(pipe, n)")
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[:1] / (steps - 1)
        y = None if self.label is None else torch.tensor([self.label])
        set_condition(self.model, t=t, y=y)

    def start(self, pipe: Any, num_inference_steps: int) -> None:
        """Before the pipeline call: read T and the first timestep from its scheduler."""
        self.num_train_timesteps = pipe.scheduler.config.num_train_timesteps
        pipe.scheduler.set_timesteps(num_inference_steps)
        self.set_timestep(pipe.scheduler.timesteps[0])

    def callback_on_step_end(
        self, pipe: Any, step: int, timestep: Tensor, callback_kwargs: dict
    ) -> dict:
        """diffusers' callback_on_step_end: the condition of the next step."""
        timesteps = pipe.scheduler.timesteps
        if step + 1 < len(timesteps):
            self.set_timestep(timesteps[step + 1])
        return callback_kwargs

    def follow_timesteps(self) -> torch.utils.hooks.RemovableHandle:
        """For pipelines without callbacks: set the condition from the timestep argument of
        every call of the denoiser (its second positional argument or `timestep`)."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.set_timestep(args[1] if len(args) > 1 else kwargs["timestep"])

        return self.model.register_forward_pre_hook(hook, with_kwargs=True)
