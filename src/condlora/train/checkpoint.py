"""Checkpoints in safetensors: model, EMA and optimizer tensors, config and step in metadata.

No pickle: the optimizer's non-tensor state (param groups) is stored as JSON in
the metadata, its tensors under ``optim.<param index>.<name>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from condlora.conditioning.config import Config, config_from_json
from condlora.core.config import to_dict
from condlora.core.errors import CondloraError
from condlora.core.safetensors_io import read_weights, write_weights

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT = "condlora-checkpoint-1"


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
    cfg: Config,
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
        "config": json.dumps(to_dict(cfg)),
        "step": str(step),
        "optim_param_groups": groups,
    }
    write_weights(path, tensors, metadata)


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was saved at, read from its metadata alone."""
    meta, _ = read_weights(path, FORMAT, "condlora checkpoint", CondloraError, tensors=False)
    return int(meta["step"])


def read_checkpoint(path: Path) -> tuple[Config, int, dict[str, dict]]:
    """(config, step, {"model": sd, "ema": sd, "optim": optimizer state dict})."""
    meta, tensors = read_weights(path, FORMAT, "condlora checkpoint", CondloraError)
    parts: dict[str, dict] = {"model": {}, "ema": {}}
    optim = {}
    for key, value in tensors.items():
        head, rest = key.split(".", 1)
        if head == "optim":
            optim[key] = value
        else:
            parts[head][rest] = value
    parts["optim"] = _unflat_optimizer(optim, meta["optim_param_groups"])
    return config_from_json(meta["config"]), int(meta["step"]), parts
