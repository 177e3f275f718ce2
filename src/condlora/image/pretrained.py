"""`condlora train --init-from`: start from released or condlora weights, copied by name.

The paper trains its LoRA models from a trained baseline; this is also how a user adds LoRA
conditioning to a model they already have. Sources:

- a condlora run folder or checkpoint (`.safetensors`): the run's EMA weights;
- improved-diffusion `.pt` files are plain state dicts of its `UNetModel`, whose module names
  condlora's ADM net shares: read with `torch.load(..., weights_only=True)`.
- EDM `.pkl` network snapshots hold `EDMPrecond` (its `model` a `SongUNet`, whose names
  condlora's DDPM++ shares) pickled with source code: read as data by `edm_pickle`, which
  runs nothing in the file.

Names are matched with the LoRA wrapper's `.base_layer` step ignored, and every copy is
shape-checked. The LoRA tensors that the source lacks stay as initialised (B = 0 leaves the
loaded function unchanged); anything else that does not match is refused in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from condlora.core.errors import CondloraError
from condlora.core.safetensors_io import read_weights
from condlora.diffusion import Denoiser
from condlora.image.build import build_denoiser
from condlora.image.config import Config
from condlora.image.edm_pickle import Record, load_edm_pickle, module_tensors
from condlora.train.checkpoint import CHECKPOINT_NAME, FORMAT

# (key, axis, what it counts, the config keys that set it): hints for a checkpoint that does
# not fit, ADM (improved-diffusion) and DDPM++ (EDM) names
FIT_HINTS = [
    ("out.2.weight", 0, "output channels", "diffusion.objective iddpm: 2 x image channels"),
    ("label_emb.weight", 0, "classes", "net.class_conditional, data.num_classes"),
    ("map_label.weight", 1, "classes", "net.class_conditional, data.num_classes"),
    ("map_augment.weight", 1, "augmentation labels", "net.augment_dim"),
]
BACKBONE_PREFIX = "net.net."  # the backbone inside Denoiser(ConditionedNet(backbone))
LORA_PARTS = (".lora_A", ".lora_B", ".lora_E", ".composer.")  # names of LoRA tensors
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


def _plain_name(name: str) -> str:
    """A parameter name without the LoRA wrapper's `.base_layer` step."""
    return name.replace(".base_layer.", ".")


def _is_lora(name: str) -> bool:
    return any(part in name for part in LORA_PARTS)


def condlora_weights(path: Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a condlora run folder or checkpoint, by plain denoiser name."""
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    meta, tensors = read_weights(path, FORMAT, "condlora checkpoint", CondloraError)
    return {_plain_name(k[4:]): v for k, v in tensors.items() if k.startswith("ema.")}


def source_weights(path: str | Path, cfg: Config) -> dict[str, torch.Tensor]:
    """Weights by plain denoiser name from a run folder, a condlora checkpoint, `.pt` or `.pkl`."""
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
    elif path.is_dir() or path.suffix in (".safetensors", ""):
        if not path.exists():
            raise CondloraError(f"no such run folder or checkpoint file: {path}")
        return condlora_weights(path)
    else:
        raise CondloraError(
            f"{path}: unknown checkpoint kind '{path.suffix}' (a run folder, .safetensors "
            "condlora, .pt improved-diffusion, .pkl EDM)"
        )
    return {BACKBONE_PREFIX + k: v for k, v in tensors.items()}


def _names(names: list[str]) -> str:
    lora = [n for n in names if _is_lora(n)]
    other = [n.removeprefix(BACKBONE_PREFIX) for n in names if not _is_lora(n)]
    parts = [f"{len(lora)} LoRA tensors"] if lora else []
    if other:
        more = ", ..." if len(other) > 4 else ""
        parts.append(f"{len(other)} others ({', '.join(other[:4])}{more})")
    return "; ".join(parts) or "none"


def init_from(
    denoiser: nn.Module, path: str | Path, cfg: Config, verbose: bool = True
) -> dict[str, list[str]]:
    """Copy weights into `denoiser` by name, shape-checked; {"copied", "fresh", "unused"}.

    Fresh LoRA tensors are expected (B = 0 keeps the function), and so are checkpoint
    weights that "only LoRA" drops (net.cond_mode lora_only). Any other weight of the net
    that the checkpoint lacks, or checkpoint weight the net lacks, means the config does
    not fit the checkpoint: refused in one line.
    """
    source = source_weights(path, cfg)
    targets = {_plain_name(k): v for k, v in denoiser.state_dict(keep_vars=True).items()}
    where = f"{path} (config '{cfg.name}')"
    report = {
        "copied": [k for k in targets if k in source],
        "fresh": [k for k in targets if k not in source],
        "unused": [k for k in source if k not in targets],
    }
    bad = [
        f"{k.removeprefix(BACKBONE_PREFIX)} {tuple(source[k].shape)} != {tuple(targets[k].shape)}"
        for k in report["copied"]
        if source[k].shape != targets[k].shape
    ]
    missing = [k for k in report["fresh"] if not _is_lora(k)]
    extra = [k for k in report["unused"] if not _is_lora(k)]
    if cfg.net.cond_mode == "lora_only":
        extra = []  # the scale-and-shift layers that "only LoRA" drops
    if bad or missing or extra or not report["copied"]:
        hints = _fit_hints(_backbone(targets), _backbone(source))
        problems = [
            f"shape mismatches ({len(bad)}): {', '.join(bad[:3])}" if bad else "",
            f"missing from the checkpoint: {_names(missing)}" if missing else "",
            f"not in this net: {_names(extra)}" if extra else "",
            "no weight names in common" if not report["copied"] else "",
        ]
        raise CondloraError(f"{where} does not fit: {hints}{'; '.join(p for p in problems if p)}")
    with torch.no_grad():
        for k in report["copied"]:
            targets[k].copy_(source[k])
    if verbose:
        print(
            f"init-from {path}: copied {len(report['copied'])} tensors; fresh: "
            f"{_names(report['fresh'])}; not used: {_names(report['unused'])}"
        )
    return report


def _backbone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(BACKBONE_PREFIX): v for k, v in tensors.items()}


def load_pretrained(path: str | Path, cfg: Config) -> Denoiser:
    """The denoiser of `cfg` (LoRA injected as configured, fresh) with a checkpoint's weights."""
    denoiser = build_denoiser(cfg)
    init_from(denoiser, path, cfg, verbose=False)
    return denoiser
