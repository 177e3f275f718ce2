"""LoRA files: safetensors with only the LoRA tensors, the LoRAConfig as JSON metadata."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from condlora.core.errors import LoRAError
from condlora.core.safetensors_io import describe_mismatch, write_weights
from condlora.lora.config import LoRAConfig
from condlora.lora.context import lora_layers
from condlora.lora.inject import inject, lora_state_dict, remove

CONFIG_KEY = "condlora.lora_config"


def save_lora(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's LoRA tensors and its LoRAConfig to a safetensors file."""
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("model has no LoRA layers to save; call inject(model, config) first")
    config = next(iter(layers.values())).state.config
    write_weights(path, lora_state_dict(model), {CONFIG_KEY: config.to_json(), "format": "pt"})


def read_lora_config(path: str | os.PathLike) -> LoRAConfig:
    """The LoRAConfig stored in a LoRA file's metadata."""
    if not Path(path).is_file():
        raise LoRAError(f"LoRA file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if CONFIG_KEY not in meta:
        raise LoRAError(f"{path} holds no {CONFIG_KEY!r} metadata; not a condlora LoRA file")
    return LoRAConfig.from_json(meta[CONFIG_KEY])


def _copy_strict(model: nn.Module, tensors: dict[str, Tensor], path: str) -> None:
    """Copy file tensors into the LoRA parameters; every key and shape must match."""
    targets = lora_state_dict(model, keep_vars=True)
    problems = describe_mismatch(targets, tensors)
    if problems:
        raise LoRAError(f"LoRA file {path} does not fit the model: {problems}")
    with torch.no_grad():
        for key, value in tensors.items():
            targets[key].copy_(value)


def _check_same_config(model_config: LoRAConfig, file_config: LoRAConfig, path: object) -> None:
    """Refuse a file whose LoRA config differs from the one the model was injected with."""
    mine, theirs = dataclasses.asdict(model_config), dataclasses.asdict(file_config)
    changed = [f"{k} {theirs[k]!r} (model: {mine[k]!r})" for k in mine if mine[k] != theirs[k]]
    if changed:
        raise LoRAError(
            f"LoRA file {path} was saved with another config than the model's LoRA: "
            f"{'; '.join(changed[:4])}"
        )


def load_lora(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Inject from the file's config if needed, then load its tensors strictly; wrapped names."""
    config = read_lora_config(path)
    layers = lora_layers(model)
    fresh = not layers
    if not fresh:
        _check_same_config(next(iter(layers.values())).state.config, config, path)
    names = inject(model, config) if fresh else sorted(layers)
    try:
        _copy_strict(model, load_file(str(path)), str(path))
    except LoRAError:
        if fresh:
            remove(model)  # leave the model as we found it
        raise
    return names
