"""Weights from released checkpoints of the original codebases, copied in by module name.

- improved-diffusion `.pt` files are plain state dicts of its `UNetModel`, whose module names
  condlora's ADM net shares: read with `torch.load(..., weights_only=True)`.
- EDM `.pkl` network snapshots hold `EDMPrecond` (its `model` a `SongUNet`, whose names
  condlora's DDPM++ shares) pickled with source code: read as data by `edm_pickle`, which
  runs nothing in the file.
- condlora's own checkpoints (`.safetensors`): the backbone of the run's EMA weights.

Every copy checks every name and shape against the configured backbone; a checkpoint that
does not fit is refused with one line naming what differs. LoRA layers injected into the
backbone are not part of it: a wrapped layer's `base_layer` takes the layer's own name, and
the LoRA tensors stay as initialised (a fresh LoRA leaves the loaded function unchanged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from condlora.conditioning.build import build_denoiser
from condlora.conditioning.config import Config
from condlora.conditioning.edm_pickle import Record, load_edm_pickle, module_tensors
from condlora.core.errors import CondloraError
from condlora.core.safetensors_io import describe_mismatch
from condlora.diffusion import Denoiser
from condlora.lora import lora_layers
from condlora.train.checkpoint import read_checkpoint

# (key, axis, what it counts, the config keys that set it): hints for a checkpoint that does
# not fit, ADM (improved-diffusion) and DDPM++ (EDM) names
FIT_HINTS = [
    ("out.2.weight", 0, "output channels", "diffusion.objective iddpm: 2 x image channels"),
    ("label_emb.weight", 0, "classes", "net.class_conditional, data.num_classes"),
    ("map_label.weight", 1, "classes", "net.class_conditional, data.num_classes"),
    ("map_augment.weight", 1, "augmentation labels", "net.augment_dim"),
]
EDM_RESAMPLE_FILTER = torch.full((1, 1, 2, 2), 0.25)  # EDM's [1, 1] filter: f f^T / sum(f)^2


def read_iddpm_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """An improved-diffusion `.pt` state dict, loaded with torch's weights-only unpickler."""
    path = Path(path)
    if not path.is_file():
        raise CondloraError(f"improved-diffusion checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # refused by the weights-only unpickler, or not a torch file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CondloraError(f"{path} is not a weights-only PyTorch state dict: {first}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CondloraError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return dict(state)


def read_edm_snapshot(
    path: str | Path, key: str = "ema"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(SongUNet tensors by name, EDMPrecond settings) of an EDM network snapshot `.pkl`.

    The snapshot is EDM's dict (`ema`, `loss_fn`, `augment_pipe`, ...) or a bare network.
    The [1, 1] resampling filters that EDM keeps as buffers are checked and dropped
    (condlora's DDPM++ resamples with that filter built in).
    """
    data = load_edm_pickle(path)
    net = data.get(key) if isinstance(data, dict) else data
    if not isinstance(net, Record):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CondloraError(f"{path} holds no EDM network under '{key}' (found: {found})")
    model = (net.state.get("_modules") or {}).get("model")
    if net.short_name != "EDMPrecond" or not isinstance(model, Record):
        raise CondloraError(
            f"{path}: condlora reads EDMPrecond networks (EDM's preconditioning), not "
            f"{net.short_name}"
        )
    if model.short_name != "SongUNet":
        raise CondloraError(
            f"{path}: the network is a {model.short_name}; condlora's DDPM++ takes EDM's SongUNet"
        )
    tensors = {}
    for name, value in module_tensors(model).items():
        if name.endswith(".resample_filter"):
            if value.shape != EDM_RESAMPLE_FILTER.shape or not torch.equal(
                value.float(), EDM_RESAMPLE_FILTER
            ):
                raise CondloraError(
                    f"{path}: {name} is not the [1, 1] resampling filter of DDPM++ "
                    f"(shape {tuple(value.shape)})"
                )
            continue
        tensors[name] = value
    settings = ("sigma_data", "label_dim", "img_resolution", "img_channels")
    return tensors, {k: net.state.get(k) for k in settings}


def backbone_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's parameters and buffers by name, without the LoRA injected into it.

    A LoRA wrapper's `base_layer` counts under the wrapper's own name (the name the
    layer had before injection); the wrapper's LoRA tensors are left out.
    """
    wrapped = sorted(lora_layers(net), key=len, reverse=True)
    out = {}
    for key, value in net.state_dict(keep_vars=True).items():
        owner = next((name for name in wrapped if key.startswith(name + ".")), None)
        if owner is None:
            out[key] = value
        elif key.startswith(f"{owner}.base_layer."):
            out[f"{owner}.{key[len(owner) + len('.base_layer.') :]}"] = value
    return out


def _fit_hints(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """What the checkpoint and the config count differently (classes, channels ...)."""
    hints = []
    for key, axis, what, setting in FIT_HINTS:
        if key not in expected and key not in given:
            continue
        have = given[key].shape[axis] if key in given else 0
        want = expected[key].shape[axis] if key in expected else 0
        if have != want:
            hints.append(f"the checkpoint has {have} {what}, the config {want} ({setting})")
    return "; ".join(hints) + ("; " if hints else "")


def copy_backbone(net: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into the backbone `net` by name; every key and shape must match."""
    target = backbone_state(net)
    mismatch = describe_mismatch(target, tensors)
    if mismatch:
        raise CondloraError(f"{source} does not fit: {_fit_hints(target, tensors)}{mismatch}")
    with torch.no_grad():
        for key, value in tensors.items():
            target[key].copy_(value)


def _condlora_backbone(path: Path) -> dict[str, torch.Tensor]:
    """The backbone tensors of a condlora checkpoint's EMA weights."""
    saved_cfg, _, parts = read_checkpoint(path)
    saved = build_denoiser(saved_cfg)
    saved.load_state_dict(parts["ema"])
    return {k: v.detach() for k, v in backbone_state(saved.net.net).items()}


def load_pretrained(path: str | Path, cfg: Config) -> Denoiser:
    """The denoiser of `cfg` (LoRA injected as configured) with a checkpoint's backbone.

    By extension: `.pt` improved-diffusion (net.arch adm), `.pkl` EDM (net.arch ddpmpp,
    diffusion.objective edm), `.safetensors` a condlora checkpoint. The LoRA stays fresh.
    """
    path = Path(path)
    arch, objective = cfg.net.arch, cfg.diffusion.objective
    where = f"{path} (config '{cfg.name}')"
    if path.suffix == ".pt":
        if arch != "adm":
            raise CondloraError(
                f"{where}: improved-diffusion weights need net.arch adm, not {arch}"
            )
        tensors = read_iddpm_checkpoint(path)
    elif path.suffix == ".pkl":
        if arch != "ddpmpp" or objective != "edm":
            raise CondloraError(
                f"{where}: EDM weights need net.arch ddpmpp and diffusion.objective edm, "
                f"not {arch} and {objective}"
            )
        tensors, settings = read_edm_snapshot(path)
        sigma_data = settings.get("sigma_data")
        if sigma_data is not None and float(sigma_data) != cfg.diffusion.sigma_data:
            raise CondloraError(
                f"{where}: the network was trained with sigma_data {sigma_data}, the config "
                f"has diffusion.sigma_data {cfg.diffusion.sigma_data}"
            )
    elif path.suffix == ".safetensors":
        tensors = _condlora_backbone(path)
    else:
        raise CondloraError(
            f"{path}: unknown checkpoint kind '{path.suffix}' (.pt improved-diffusion, "
            ".pkl EDM, .safetensors condlora)"
        )
    denoiser = build_denoiser(cfg)
    copy_backbone(denoiser.net.net, tensors, where)
    return denoiser
