"""Strength schedules for a static LoRA: how strongly it acts at each noise level and block.

A schedule is a table S of shape (blocks, bins), started at 1.0, interpolated over the
normalised noise level t in [0, 1] (0 clean, 1 noisiest) as TimeLoRA interpolates its table
(hat functions at `bins` evenly spaced knots, `hat_table`). A wrapped layer of block b
computes

    y = W x + b + s(t, b) * dW x,      s(t, b) = sum_j hat_j(t) S[b, j]

so the schedule of all ones is the static LoRA, and a constant table c is the LoRA at
strength c. `apply_schedule` wraps a model's LoRA modules; `scheduled(model, t)` sets the
noise level for the calls in its block (as `conditioning` does for conditional LoRA).
Exports: one CSV row per sampling step and ComfyUI-style keyframes (strength at the start
percent of each step).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condlora.core.errors import LoRAError
from condlora.lora.composers import time_input

ONE_BLOCK = "all"


def block_of(name: str, per_block: bool) -> str:
    """The block a module belongs to: one for all, or its top-level part and index
    ("enc.2.attn.qkv" -> "enc.2", "mid.attn.proj" -> "mid")."""
    if not per_block:
        return ONE_BLOCK
    match = re.match(r"^([^.]+)(?:\.(\d+))?", name)
    return ".".join(p for p in match.groups() if p is not None)


class StrengthSchedule(nn.Module):
    """The learnable table S (blocks, bins) and its interpolation over t."""

    def __init__(self, blocks: Sequence[str], bins: int = 8) -> None:
        super().__init__()
        if bins < 1 or not blocks or len(set(blocks)) != len(blocks):
            raise LoRAError(f"a schedule needs bins >= 1 and distinct blocks, got {bins}, {blocks}")
        self.blocks = list(blocks)
        self.table = nn.Parameter(torch.ones(len(blocks), bins))
        self.t: Tensor | None = None  # (batch,) noise level of the current call
        self.active = True  # False: the wrapped layers compute the base model alone

    def strength(self, t: Tensor | float) -> Tensor:
        """(batch, blocks) strengths at normalised noise levels t (hat interpolation)."""
        bins = self.table.shape[1]
        t = time_input(t).to(self.table.device)
        if bins == 1:
            return self.table[:, 0].expand(t.shape[0], -1)
        pos = t.clamp(0, 1) * (bins - 1)
        i0 = pos.floor().long().clamp(0, bins - 2)
        frac = (pos - i0)[:, None]
        return self.table[:, i0].T * (1 - frac) + self.table[:, i0 + 1].T * frac

    def at_steps(self, ts: Sequence[float]) -> list[dict[str, float]]:
        """{block: strength} at each noise level of a sampler's steps."""
        with torch.no_grad():
            values = self.strength(torch.tensor(list(ts), dtype=torch.float32))
        return [dict(zip(self.blocks, map(float, row), strict=True)) for row in values]

    def to_csv(self, ts: Sequence[float]) -> str:
        """One row per sampling step: step, t, then one strength column per block."""
        return steps_csv(self.blocks, ts, self.at_steps(ts))

    def keyframes(self, ts: Sequence[float]) -> str:
        """ComfyUI-style hook keyframes: per block, the strength from the start percent of
        each step (step k of n starts at k / n of the sampling)."""
        return steps_keyframes(self.blocks, ts, self.at_steps(ts))

    def diffusers_callback(self, ts: Sequence[float], adapter: str = "default") -> str:
        """A Python module for diffusers: `set_first(pipe)` before the call, then
        `callback_on_step_end=strength_callback` sets the LoRA adapter's weight of each next
        step. One weight for the whole LoRA: the mean over blocks (per-block strengths are
        in BLOCK_STRENGTHS, and the ComfyUI keyframes)."""
        return steps_callback(self.blocks, ts, self.at_steps(ts), [adapter])


def steps_csv(columns: Sequence[str], ts: Sequence[float], rows: list[dict[str, float]]) -> str:
    """One row per sampling step: step, t, then one value per column."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "t", *columns])
    for k, (t, row) in enumerate(zip(ts, rows, strict=True)):
        writer.writerow([k, f"{t:.6g}", *(f"{row[c]:.6g}" for c in columns)])
    return out.getvalue()


def steps_keyframes(
    columns: Sequence[str], ts: Sequence[float], rows: list[dict[str, float]]
) -> str:
    """ComfyUI-style hook keyframes: per column, the strength from the start percent of
    each step (step k of n starts at k / n of the sampling)."""
    n = len(ts)
    frames = {
        c: [
            {"start_percent": round(k / n, 6), "strength": round(row[c], 6)}
            for k, row in enumerate(rows)
        ]
        for c in columns
    }
    return json.dumps({"steps": n, "noise_levels": list(ts), "keyframes": frames}, indent=1)


def steps_callback(
    columns: Sequence[str],
    ts: Sequence[float],
    rows: list[dict[str, float]],
    adapters: Sequence[str],
) -> str:
    """A Python module for diffusers' `callback_on_step_end`. One adapter: its weight at each
    step is the mean over the columns (blocks; each column in BLOCK_STRENGTHS). Several
    adapters (one per column, e.g. the segments of a baked run): each its own column."""
    per_block = {c: [round(r[c], 6) for r in rows] for c in columns}
    if len(adapters) == 1:
        weights = [[round(sum(r.values()) / len(r), 6)] for r in rows]
    else:
        weights = [[round(r[c], 6) for c in columns] for r in rows]
    return f'''"""LoRA strength per sampling step, from condlora ({len(ts)} steps).

    pipe.load_lora_weights(..., adapter_name=...)  # each of ADAPTERS
    set_first(pipe)
    pipe(..., num_inference_steps={len(ts)}, callback_on_step_end=strength_callback)
"""

ADAPTERS = {list(adapters)!r}
WEIGHTS = {weights!r}  # per step: one weight per adapter
BLOCK_STRENGTHS = {per_block!r}


def set_first(pipe, adapters=ADAPTERS):
    """The weights of the first step, before the pipeline runs."""
    pipe.set_adapters(adapters, adapter_weights=WEIGHTS[0])


def strength_callback(pipe, step, timestep, callback_kwargs, adapters=ADAPTERS):
    """diffusers' callback_on_step_end: set the weights of the next step."""
    if step + 1 < len(WEIGHTS):
        pipe.set_adapters(adapters, adapter_weights=WEIGHTS[step + 1])
    return callback_kwargs
'''


class ScheduledLoRA(nn.Module):
    """A frozen base layer plus a static LoRA update at the schedule's strength."""

    def __init__(
        self, base_layer: nn.Module, delta: Tensor, schedule: StrengthSchedule, block: int
    ):
        super().__init__()
        if tuple(delta.shape) != tuple(base_layer.weight.shape):
            raise LoRAError(
                f"LoRA update of shape {tuple(delta.shape)} does not fit the layer's weight "
                f"{tuple(base_layer.weight.shape)}"
            )
        self.base_layer = base_layer
        self.register_buffer("delta", delta.to(base_layer.weight), persistent=False)
        self.schedule = [schedule]  # a list: not registered as this module's child
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        """W x + b + s(t, block) * dW x, s per sample."""
        schedule = self.schedule[0]
        if not schedule.active:
            return self.base_layer(x)
        if schedule.t is None:
            raise LoRAError("a scheduled LoRA needs the noise level: call it inside `scheduled`")
        s = schedule.strength(schedule.t)[:, self.block].to(x.dtype)
        if isinstance(self.base_layer, nn.Linear):
            update = F.linear(x, self.delta)
            return self.base_layer(x) + update * s.reshape(-1, *[1] * (x.dim() - 1))
        conv = {3: F.conv1d, 4: F.conv2d}[x.dim()]
        base = self.base_layer
        update = conv(x, self.delta, None, base.stride, base.padding, base.dilation, base.groups)
        return base(x) + update * s.reshape(-1, *[1] * (x.dim() - 1))


def apply_schedule(
    model: nn.Module, deltas: dict[str, Tensor], bins: int = 8, per_block: bool = False
) -> StrengthSchedule:
    """Wrap each module named in `deltas` (name -> dW) with its scheduled update; the base
    model is frozen. Returns the schedule (its table is the only trainable tensor)."""
    modules = dict(model.named_modules())
    missing = sorted(set(deltas) - set(modules))
    if missing:
        raise LoRAError(f"the LoRA's modules {missing[:3]} are not in the base model")
    model.requires_grad_(False)
    blocks = sorted({block_of(name, per_block) for name in deltas})
    schedule = StrengthSchedule(blocks, bins)
    for name, delta in deltas.items():
        parent, _, child = name.rpartition(".")
        layer = ScheduledLoRA(
            modules[name], delta, schedule, blocks.index(block_of(name, per_block))
        )
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return schedule


def follow_noise_level(
    net: nn.Module, schedule: StrengthSchedule, time_of: Callable[[Tensor], Tensor]
) -> torch.utils.hooks.RemovableHandle:
    """Set the schedule's t at every call of `net(x, noise_labels, ...)` (a denoiser's
    backbone call) from its noise labels, so training and sampling need no `scheduled`."""

    def hook(module: nn.Module, args: tuple) -> None:
        schedule.t = time_input(time_of(args[1]))

    return net.register_forward_pre_hook(hook)


@contextmanager
def base_only(schedule: StrengthSchedule) -> Iterator[None]:
    """Within the block, the wrapped layers compute the base model (strength 0, no update)."""
    saved, schedule.active = schedule.active, False
    try:
        yield
    finally:
        schedule.active = saved


@contextmanager
def scheduled(schedule: StrengthSchedule, t: Tensor | float) -> Iterator[None]:
    """Within the block, the scheduled layers read noise level t ((batch,) or a scalar)."""
    saved, schedule.t = schedule.t, time_input(t)
    try:
        yield
    finally:
        schedule.t = saved
