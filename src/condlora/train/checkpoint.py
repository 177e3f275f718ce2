"""The EMA of model weights, and checkpoints in safetensors (model, EMA and optimizer tensors;
config, kind and step in metadata).

Two files per run folder, as EMA ships snapshots apart from training state:
    checkpoint.safetensors   model, EMA and optimizer: what `--resume` continues from
    ema.safetensors          the EMA weights alone with config, kind and step: what sampling,
                             generation and the page read (a third of the checkpoint's size)

No pickle: the optimizer's non-tensor state (param groups) is stored as JSON in the
metadata, its tensors under ``optim.<param index>.<name>``. The config is stored as JSON
with its `kind` (which task wrote it: "image-diffusion", "synthesis-vae", ...), so a reader
rebuilds the right config class and refuses a checkpoint of another task.
The EMA of the model weights follows the originals' decay schedules:
- "ramp" (condlora's default): decay min(d, (1 + n) / (10 + n)) after n updates, so short runs
  are not dominated by the initial weights.
- "fixed": decay d at every update (improved-diffusion's rate 0.9999).
- "edm": EDM's half-life in samples, beta = 0.5 ** (batch / max(h, 1e-8)) with
  h = min(halflife, samples_seen * rampup) (EDM's training loop, ema_rampup_ratio).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from condlora.core.config import config_from_json, to_dict
from condlora.core.errors import CondloraError, ConfigError
from condlora.core.safetensors_io import load_state_checked, read_weights, write_weights
from condlora.core.structure import structure_version
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
        self._tensors: tuple | None = None  # (source model, structure count, lists)

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

    def _paired(self, model: nn.Module) -> tuple[list, list, list, list]:
        """(EMA parameters, model parameters, EMA buffers, model buffers), walked once per
        model and kept while no module anywhere registers a parameter, buffer or submodule
        (a walk of a few hundred modules per step costs about 1% of a digits step). The
        Parameter objects are kept, not their data, so `.to()` and `.data =` stay seen."""
        hit = self._tensors
        if hit is None or hit[0] is not model or hit[1] != structure_version():
            ema, own = list(self.model.parameters()), list(model.parameters())
            ema_buffers, buffers = list(self.model.buffers()), list(model.buffers())
            if len(ema) != len(own) or len(ema_buffers) != len(buffers):
                raise CondloraError("EMA.update: the model's tensors are not those of the copy")
            hit = self._tensors = (model, structure_version(), (ema, own, ema_buffers, buffers))
        return hit[2]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """ema <- decay * ema + (1 - decay) * model; buffers are copied."""
        weight = 1.0 - self.decay_at(step)
        ema_params, params, ema_buffers, buffers = self._paired(model)
        params = [
            p if p.dtype == e.dtype else p.to(e.dtype)
            for e, p in zip(ema_params, params, strict=True)
        ]
        torch._foreach_lerp_(ema_params, params, weight)
        for e, b in zip(ema_buffers, buffers, strict=True):
            e.copy_(b)

    def __getstate__(self) -> dict:
        """Copies and pickles hold no cached lists (they name other tensors)."""
        return self.__dict__ | {"_tensors": None}


CHECKPOINT_NAME = "checkpoint.safetensors"
EMA_NAME = "ema.safetensors"
FORMAT = "condlora-checkpoint-1"
EMA_FORMAT = "condlora-ema-1"
LEGACY_KIND = "image-diffusion"  # checkpoints written before kinds were recorded


def _flat_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], str]:
    tensors = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{index}.{name}"] = value
    return tensors, json.dumps(state["param_groups"])


def _unflat_optimizer(tensors: dict[str, torch.Tensor], groups: str, path: Path) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = (key.split(".", 2) + ["", ""])[:3]
        if not index.isdigit() or not name:
            raise CondloraError(f"{path}: malformed optimizer tensor name '{key}'")
        state.setdefault(int(index), {})[name] = value
    try:
        param_groups = json.loads(groups)
    except json.JSONDecodeError:
        raise CondloraError(f"{path}: its optimizer metadata is not JSON") from None
    well_formed = isinstance(param_groups, list) and all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in param_groups
    )
    if not well_formed:
        raise CondloraError(f"{path}: its optimizer metadata is not a list of parameter groups")
    return {"state": state, "param_groups": param_groups}


def pretrained_keys(model: nn.Module) -> set[str]:
    """State-dict keys that building the model reloads from a frozen pretrained base: those
    for which a submodule's `from_pretrained_state(key)` says so (the LoRA on such a base is
    not). Checkpoints and EMA files leave them out, so a LoRA run on a large base stays small."""
    keys = set()
    for prefix, module in model.named_modules():
        owns = getattr(module, "from_pretrained_state", None)
        if owns is not None:
            head = f"{prefix}." if prefix else ""
            keys |= {head + k for k in module.state_dict() if owns(k)}
    return keys


def saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without its frozen pretrained base (`pretrained_keys`)."""
    skip = pretrained_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in skip}


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
    tensors = {f"model.{k}": v for k, v in saved_state(model).items()}
    tensors.update({f"ema.{k}": v for k, v in saved_state(ema).items()})
    optim_tensors, groups = _flat_optimizer(optimizer.state_dict())
    tensors.update(optim_tensors)
    metadata = {
        "format": FORMAT,
        "kind": kind,
        "config": json.dumps(to_dict(cfg)),
        "step": str(step),
        "optim_param_groups": groups,
    }
    write_weights(path, tensors, metadata, sync=True)


def _check_kind(path: Path, meta: dict, kind: str) -> None:
    found = meta.get("kind", LEGACY_KIND)
    if found != kind:
        raise CondloraError(f"{path} is a {found} checkpoint, not a {kind} one")


def _read_meta(path: Path, kind: str) -> dict:
    """The checkpoint's metadata, with its kind and every key it needs checked."""
    meta, _ = read_weights(path, FORMAT, "condlora checkpoint", CondloraError, tensors=False)
    _check_kind(path, meta, kind)
    missing = [k for k in ("config", "step", "optim_param_groups") if k not in meta]
    if missing:
        raise CondloraError(f"{path}: its metadata lacks {', '.join(missing)}")
    if not meta["step"].isdigit():
        raise CondloraError(f"{path}: its metadata step {meta['step']!r} is not a step number")
    return meta


def _stored_config(path: Path, meta: dict, cls: type) -> Any:
    try:
        return config_from_json(cls, meta["config"])
    except json.JSONDecodeError:
        raise CondloraError(f"{path}: its config metadata is not JSON") from None
    except ConfigError as err:
        raise CondloraError(f"{path}: its stored config is not valid: {err}") from None


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was saved at, read from its metadata alone."""
    meta, _ = read_weights(path, FORMAT, "condlora checkpoint", CondloraError, tensors=False)
    if not meta.get("step", "").isdigit():
        raise CondloraError(f"{path}: its metadata has no step number")
    return int(meta["step"])


def checkpoint_config(path: Path, cls: type, kind: str) -> tuple[Any, int]:
    """(config, step) of a checkpoint, read from its metadata alone."""
    meta = _read_meta(path, kind)
    return _stored_config(path, meta, cls), int(meta["step"])


def read_checkpoint(path: Path, cls: type, kind: str) -> tuple[Any, int, dict[str, dict]]:
    """(config of class `cls`, step, {"model": sd, "ema": sd, "optim": optimizer state dict}).

    A damaged file, a malformed name or metadata, or a NaN / inf tensor is refused in one line.
    """
    meta = _read_meta(path, kind)
    cfg = _stored_config(path, meta, cls)
    _, tensors = read_weights(path, FORMAT, "condlora checkpoint", CondloraError)
    parts: dict[str, dict] = {"model": {}, "ema": {}}
    optim = {}
    for key, value in tensors.items():
        head, _, rest = key.partition(".")
        if head == "optim":
            optim[key] = value
        elif head in parts and rest:
            parts[head][rest] = value
        else:
            raise CondloraError(f"{path}: unexpected tensor '{key}' (not model., ema. or optim.)")
    parts["optim"] = _unflat_optimizer(optim, meta["optim_param_groups"], path)
    return cfg, int(meta["step"]), parts


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict, where: str) -> None:
    """opt.load_state_dict after checking its groups and every slot's shape against the params."""
    params = [p for group in opt.param_groups for p in group["params"]]
    sizes = [len(g["params"]) for g in state["param_groups"]]
    if sizes != [len(g["params"]) for g in opt.param_groups]:
        raise CondloraError(f"{where}: the optimizer state does not fit the model's parameters")
    ids = [i for g in state["param_groups"] for i in g["params"]]
    index = dict(zip(ids, params, strict=True))
    for i, slots in state["state"].items():
        if i not in index:
            raise CondloraError(f"{where}: optimizer state for unknown parameter {i}")
        for name, value in slots.items():
            if value.dim() and value.shape != index[i].shape:
                raise CondloraError(
                    f"{where}: optimizer {name} of parameter {i} has shape "
                    f"{tuple(value.shape)}, the parameter {tuple(index[i].shape)}"
                )
    try:
        opt.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as err:
        raise CondloraError(f"{where}: the optimizer state does not load ({err})") from None


def load_training_state(
    path: Path, parts: dict[str, dict], model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer
) -> None:
    """Model, EMA and optimizer from a checkpoint's parts, each checked before it is loaded."""
    load_state_checked(model, parts["model"], f"{path} (model)", skip=pretrained_keys(model))
    load_state_checked(ema, parts["ema"], f"{path} (EMA)", skip=pretrained_keys(ema))
    load_optimizer_state(opt, parts["optim"], str(path))


def save_ema_model(path: Path, cfg: Any, kind: str, step: int, ema: torch.nn.Module) -> None:
    """Write the inference file: the EMA weights with config, kind and step (atomically)."""
    metadata = {"format": EMA_FORMAT, "kind": kind, "config": json.dumps(to_dict(cfg))}
    write_weights(path, saved_state(ema), {**metadata, "step": str(step)}, sync=True)


def ema_model_config(path: Path, cls: type, kind: str) -> tuple[Any, int]:
    """(config, step) of an inference file, read from its metadata alone."""
    meta, _ = read_weights(path, EMA_FORMAT, "condlora EMA model", CondloraError, tensors=False)
    _check_kind(path, meta, kind)
    if "config" not in meta or not meta.get("step", "").isdigit():
        raise CondloraError(f"{path}: its metadata lacks the config or the step")
    return _stored_config(path, meta, cls), int(meta["step"])


def read_ema_model(path: Path, cls: type, kind: str) -> tuple[Any, int, dict[str, torch.Tensor]]:
    """(config, step, EMA state dict) of a run folder's inference file (ema.safetensors).

    A folder from before inference files existed has only its checkpoint: its EMA part is read.
    """
    folder = Path(path).parent
    if not Path(path).is_file() and (folder / CHECKPOINT_NAME).is_file():
        cfg, step, parts = read_checkpoint(folder / CHECKPOINT_NAME, cls, kind)
        return cfg, step, parts["ema"]
    cfg, step = ema_model_config(path, cls, kind)
    _, tensors = read_weights(path, EMA_FORMAT, "condlora EMA model", CondloraError)
    return cfg, step, tensors


def load_ema(
    folder: Path, cls: type, kind: str, build: Callable[[Any], torch.nn.Module]
) -> tuple[Any, int, torch.nn.Module]:
    """(config, step, `build(config)` holding the folder's EMA weights, in eval mode)."""
    path = Path(folder) / EMA_NAME
    cfg, step, state = read_ema_model(path, cls, kind)
    module = build(cfg)
    load_state_checked(module, state, f"{path} (EMA)", skip=pretrained_keys(module))
    return cfg, step, module.eval()
