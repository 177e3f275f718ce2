"""LoRA files: safetensors with only the LoRA tensors, the LoRAConfig as JSON metadata."""

from __future__ import annotations

import copy
import dataclasses
import os

import torch
from torch import Tensor, nn

from condlora.core.errors import LoRAError
from condlora.core.safetensors_io import describe_mismatch, read_weights, write_weights
from condlora.lora.config import LoRAConfig
from condlora.lora.inject import inject, lora_state_dict, remove
from condlora.lora.runtime import lora_layers

CONFIG_KEY = "condlora.lora_config"


def save_lora(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's LoRA tensors and its LoRAConfig to a safetensors file."""
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("model has no LoRA layers to save; call inject(model, config) first")
    config = next(iter(layers.values())).state.config
    write_weights(path, lora_state_dict(model), {CONFIG_KEY: config.to_json(), "format": "pt"})


def read_lora_config(path: str | os.PathLike) -> LoRAConfig:
    """The LoRAConfig stored in a LoRA file's metadata (the header alone is read)."""
    meta, _ = read_weights(path, None, "LoRA file", LoRAError, tensors=False)
    if CONFIG_KEY not in meta:
        raise LoRAError(f"{path} holds no {CONFIG_KEY!r} metadata; not a condlora LoRA file")
    try:
        return LoRAConfig.from_json(meta[CONFIG_KEY])
    except LoRAError as err:
        raise LoRAError(f"{path}: {err}") from None


def read_lora_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a condlora LoRA file: checked header, floating point, finite."""
    _, tensors = read_weights(path, None, "LoRA file", LoRAError)
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise LoRAError(f"{path}: tensor {key} is {value.dtype}, not floating point")
    return tensors


def _copy_strict(model: nn.Module, tensors: dict[str, Tensor], path: str) -> None:
    """Copy file tensors into the LoRA parameters; every key and shape must match."""
    targets = lora_state_dict(model, keep_vars=True)
    problems = describe_mismatch(targets, tensors)
    if problems:
        raise LoRAError(f"LoRA file {path} does not fit the model: {problems}")
    with torch.no_grad():
        for key, value in tensors.items():
            targets[key].copy_(value)


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of the model's structure on the meta device (shapes only, no memory)."""
    memo = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        meta = tensor.detach().to("meta")
        memo[id(tensor)] = (
            nn.Parameter(meta, tensor.requires_grad) if tensor.requires_grad else meta
        )
    return copy.deepcopy(model, memo)


def _inject_for(model: nn.Module, config: LoRAConfig, path: str | os.PathLike) -> list[str]:
    try:
        return inject(model, config)
    except LoRAError as err:
        raise LoRAError(f"LoRA file {path}: {err}") from None


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
    """Inject from the file's config if needed, then load its tensors strictly; wrapped names.

    The file's config is first injected into a meta-device copy of the model, so a file
    whose tensors do not fit is refused before any LoRA memory is allocated.
    """
    config = read_lora_config(path)
    tensors = read_lora_tensors(path)
    layers = lora_layers(model)
    fresh = not layers
    if not fresh:
        _check_same_config(next(iter(layers.values())).state.config, config, path)
    if fresh:
        skeleton = _meta_copy(model)
        with torch.device("meta"):  # the composers' tables too
            _inject_for(skeleton, config, path)
        problems = describe_mismatch(lora_state_dict(skeleton), tensors)
        if problems:
            raise LoRAError(f"LoRA file {path} does not fit the model: {problems}")
    names = _inject_for(model, config, path) if fresh else sorted(layers)
    try:
        _copy_strict(model, tensors, str(path))
    except LoRAError:
        if fresh:
            remove(model)  # leave the model as we found it
        raise
    return names
