"""Setting the condition that wrappers read, and merging one condition into the weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from condlora.core.errors import LoRAError
from condlora.lora.layer import CondLoRALayer
from condlora.lora.state import ConditionState


def lora_layers(model: nn.Module) -> dict[str, CondLoRALayer]:
    """Every CondLoRALayer inside `model`, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CondLoRALayer)}


def _states(model: nn.Module) -> list[ConditionState]:
    unique = {id(layer.state): layer.state for layer in lora_layers(model).values()}
    return list(unique.values())


@contextmanager
def conditioning(model: nn.Module, t: Any = None, y: Any = None, emb: Any = None) -> Iterator[None]:
    """Within the block, every wrapper in `model` sees condition (t, y, emb); nestable.

    t: float (batch,) or scalar in [0, 1] (0 = clean, 1 = most noise); y: long (batch,) class
    indices or float (batch, num_classes) class weights; emb: (batch, emb_dim). The condition
    is replaced as a whole (an inner block does not inherit the outer t); inputs the method
    does not read are ignored. No-op for a model without LoRA.
    """
    states = _states(model)
    saved = [state.snapshot() for state in states]
    try:
        for state in states:
            state.set(t=t, y=y, emb=emb)
        yield
    finally:
        for state, old in zip(states, saved, strict=True):
            state.restore(old)


def merge(model: nn.Module, t: Any = None, y: Any = None, emb: Any = None) -> None:
    """Fold the LoRA update at one fixed condition into every wrapped base weight and bias."""
    layers = lora_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise LoRAError("LoRA is already merged; call unmerge(model) first")
    with torch.no_grad(), conditioning(model, t=t, y=y, emb=emb):
        deltas = {}
        for name, layer in layers.items():
            w = layer.composer(**layer.state.inputs())
            try:
                deltas[name] = layer.single_condition_weights(w)
            except LoRAError as err:
                raise LoRAError(f"{name}: {err} (pass a single t/y/emb to merge)") from None
        for name, layer in layers.items():
            layer.merge(deltas[name])


def unmerge(model: nn.Module) -> None:
    """Exact inverse of `merge` (the saved weights are restored, not the deltas subtracted)."""
    layers = list(lora_layers(model).values())
    if layers and not all(layer.merged for layer in layers):
        raise LoRAError("LoRA is not merged; nothing to unmerge")
    for layer in layers:
        layer.unmerge()


@contextmanager
def merged(model: nn.Module, t: Any = None, y: Any = None, emb: Any = None) -> Iterator[None]:
    """Fold the update at one condition into the weights for the block; undone exactly on exit."""
    merge(model, t=t, y=y, emb=emb)
    try:
        yield
    finally:
        unmerge(model)
