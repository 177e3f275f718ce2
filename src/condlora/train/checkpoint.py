"""Checkpoints in safetensors: model, EMA and optimizer tensors; config, kind and step in metadata.

No pickle: the optimizer's non-tensor state (param groups) is stored as JSON in the
metadata, its tensors under ``optim.<param index>.<name>``. The config is stored as JSON
with its `kind` (which task wrote it: "image-diffusion", "synthesis-vae", ...), so a reader
rebuilds the right config class and refuses a checkpoint of another task.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from condlora.core.config import config_from_json, to_dict
from condlora.core.errors import CondloraError
from condlora.core.safetensors_io import read_weights, write_weights

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT = "condlora-checkpoint-1"
LEGACY_KIND = "image-diffusion"  # checkpoints written before kinds were recorded


def _flat_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], str]:
    tensors = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{index}.{name}"] = value
    return tensors, json.dumps(state["param_groups"])


def _unflat_optimizer(tensors: dict[str, torch.Tensor], groups: str) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": json.loads(groups)}


def save_checkpoint(
    path: Path,
    cfg: Any,
    kind: str,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Write the checkpoint atomically (temporary file, then rename: no half-written file)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    optim_tensors, groups = _flat_optimizer(optimizer.state_dict())
    tensors.update(optim_tensors)
    metadata = {
        "format": FORMAT,
        "kind": kind,
        "config": json.dumps(to_dict(cfg)),
        "step": str(step),
        "optim_param_groups": groups,
    }
    write_weights(path, tensors, metadata)


def _check_kind(path: Path, meta: dict, kind: str) -> None:
    found = meta.get("kind", LEGACY_KIND)
    if found != kind:
        raise CondloraError(f"{path} is a {found} checkpoint, not a {kind} one")


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was saved at, read from its metadata alone."""
    meta, _ = read_weights(path, FORMAT, "condlora checkpoint", CondloraError, tensors=False)
    return int(meta["step"])


def checkpoint_config(path: Path, cls: type, kind: str) -> tuple[Any, int]:
    """(config, step) of a checkpoint, read from its metadata alone."""
    meta, _ = read_weights(path, FORMAT, "condlora checkpoint", CondloraError, tensors=False)
    _check_kind(path, meta, kind)
    return config_from_json(cls, meta["config"]), int(meta["step"])


def read_checkpoint(path: Path, cls: type, kind: str) -> tuple[Any, int, dict[str, dict]]:
    """(config of class `cls`, step, {"model": sd, "ema": sd, "optim": optimizer state dict})."""
    meta, tensors = read_weights(path, FORMAT, "condlora checkpoint", CondloraError)
    _check_kind(path, meta, kind)
    parts: dict[str, dict] = {"model": {}, "ema": {}}
    optim = {}
    for key, value in tensors.items():
        head, rest = key.split(".", 1)
        if head == "optim":
            optim[key] = value
        else:
            parts[head][rest] = value
    parts["optim"] = _unflat_optimizer(optim, meta["optim_param_groups"])
    return config_from_json(cls, meta["config"]), int(meta["step"]), parts
