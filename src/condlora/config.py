"""Experiment configuration: dataclasses with defaults, YAML files that override them.

A YAML config holds only what differs from the defaults below. Keys are checked
against the dataclasses, so a misspelled key fails with the list of valid keys
instead of being silently ignored. Command-line overrides use dotted paths:
``train.lr=1e-3 lora.rank=8``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from condlora.errors import ConfigError
from condlora.lora import LoRAConfig


@dataclass
class DataConfig:
    name: str = "digits"  # "digits" (embedded) | "cifar10" (python format) | "folder" (images)
    path: str | None = None  # cifar10: cifar-10-batches-py or the .tar.gz; folder: the folder
    resolution: int = 16  # image side (digits: upsampled from 8; cifar10: 32; folder: resized)
    channels: int = 0  # image channels (0: the data set's own: digits 1, cifar10 3, folder 3)
    num_classes: int = -1  # classes (-1: the data set's own: 10, or a folder's class subfolders)
    holdout: int = 297  # digits / folder: images kept out of training (cifar10: its test split)
    split_seed: int = 0  # seed of the train / held-out split


@dataclass
class NetConfig:
    arch: str = "small_unet"  # backbone: "small_unet" | "adm" (IDDPM) | "ddpmpp" (EDM DDPM++)
    model_channels: int = 16  # base width
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4])  # width per level
    num_blocks: int = 1  # residual blocks per level (decoder: one more)
    attn_resolutions: list[int] = field(default_factory=lambda: [8])  # where attention sits
    num_heads: int = 1  # attention heads
    patch_size: int = 1  # small_unet: run on p x p pixel patches (1: on pixels)
    noise_channels: int | None = None  # noise-embedding width (None: the arch's own default)
    augment_dim: int = 0  # ddpmpp: width of the augmentation label (9 with EDM's augmentation)
    class_conditional: bool = True  # condition on the class label
    cond_mode: str = "scale_shift"  # residual blocks: "scale_shift" | "lora_only" | "both"
    dropout: float = 0.0  # dropout in residual blocks


@dataclass
class DiffusionConfig:
    objective: str = "edm"  # "edm" | "ddpm" (epsilon) | "v" (v-prediction) | "iddpm" (learned var.)
    schedule: str = "linear"  # discrete schedule for ddpm / v: "linear" | "cosine"
    num_timesteps: int = 1000  # discrete steps T for ddpm / v
    sigma_data: float = 0.5  # edm: data standard deviation in the preconditioning
    p_mean: float = -1.2  # edm: mean of log sigma during training
    p_std: float = 1.2  # edm: std of log sigma during training
    sampler: str = "heun"  # "heun" | "ddim" | "ddpm" | "iddpm" (learned variance, respaced)
    guidance: float = 1.0  # classifier-free guidance scale at sampling (1: none)
    sample_steps: int = 18  # sampling steps


@dataclass
class TrainConfig:
    batch_size: int = 128  # global batch (split across processes)
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 200  # linear learning-rate warm-up
    lr_schedule: str = "cosine"  # after warm-up: "cosine" (decay to 0 at max_steps) | "constant"
    max_steps: int = 1100  # optimizer steps (also the horizon of the lr schedule)
    grad_clip: float = 1.0  # max gradient norm (0 disables)
    grad_accum: int = 1  # micro-batches per optimizer step
    augment_p: float = 0.0  # EDM geometric augmentation probability (net.augment_dim: 9)
    label_dropout: float = 0.0  # fraction of labels replaced by the null class (for guidance)
    ema_decay: float = 0.999  # EMA decay (ramped up over the first steps)
    mixed_precision: str = "no"  # accelerate: "no" | "fp16" | "bf16"
    channels_last: bool = True  # NHWC memory layout (about 20% faster convs on CPU and GPU)
    compile: bool = False  # torch.compile the training loss (accelerate's inductor backend)
    seed: int = 0  # seeds init, data order and noise
    log_every: int = 50  # steps between metrics-log lines
    sample_every: int = 500  # steps between sample grids (0: only at the end)
    ckpt_every: int = 500  # steps between checkpoints (always one at the end)


@dataclass
class Config:
    name: str = "digits"  # run name, used for the default output folder
    data: DataConfig = field(default_factory=DataConfig)
    net: NetConfig = field(default_factory=NetConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """Check (and lightly coerce) one value against its type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _check_value(value, inner[0], where)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a float, got {value!r}") from None
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if hint in (float, str) and not isinstance(value, hint):
        raise ConfigError(f"{where} must be a {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, refusing unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{where or 'config'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in valid:
            raise ConfigError(
                f"unknown config key '{path}'{_suggest(str(key), valid)}; "
                f"valid keys{' in ' + repr(where) if where else ''}: {', '.join(valid)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, path)
        else:
            kwargs[key] = _check_value(value, hint, path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts and lists (YAML / JSON ready)."""
    return dataclasses.asdict(cfg)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=1e-3", ...]`` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' is not of the form key=value (e.g. train.lr=1e-3)"
            )
        key, raw = item.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return nested


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config as a dict, with its `base:` file (relative to it) merged underneath."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through 'base:'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {data!r}")
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(_read_yaml(path.parent / str(base), (*seen, path.resolve())), data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (on its `base:` file and the defaults), then key=value overrides."""
    data = _merge(_read_yaml(Path(path)), parse_overrides(overrides or []))
    return from_dict(Config, data)


def config_from_json(text: str) -> Config:
    """Rebuild a config stored as JSON (checkpoint metadata)."""
    return from_dict(Config, json.loads(text))
