"""The image-diffusion run config: dataclasses whose defaults a YAML file overrides.

See `condlora.core.config` for the file format (override-only YAML, `base:` files,
dotted key=value overrides, unknown keys refused).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from condlora.core.config import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Each,
    OneOf,
    Range,
    from_dict,
    read_config,
)
from condlora.diffusion.objectives import LOSS_REDUCTIONS
from condlora.diffusion.precond import OBJECTIVES, SCHEDULES
from condlora.diffusion.samplers import LEARNED_VARIANCE_SAMPLERS, SAMPLERS
from condlora.lora import LoRAConfig
from condlora.nets.unet import COND_MODES
from condlora.train.config import TrainConfig

DATA_SETS = {"digits": (1, 10), "cifar10": (3, 10), "folder": (3, None)}  # channels, classes
ARCHS = ("small_unet", "adm", "ddpmpp")
DECODER_NLLS = ("tanh", "exact")  # diffusion.decoder_nll
MAX_RESOLUTION = 4096  # image side
MAX_WIDTH = 16384  # net.model_channels


@dataclass
class DataConfig:
    name: str = "digits"  # "digits" (embedded) | "cifar10" (python format) | "folder" (images)
    path: str | None = None  # cifar10: cifar-10-batches-py or the .tar.gz; folder: the folder
    resolution: int = 16  # image side (digits: upsampled from 8; cifar10: 32; folder: resized)
    channels: int = 0  # image channels (0: the data set's own: digits 1, cifar10 3, folder 3)
    num_classes: int = -1  # classes (-1: the data set's own: 10, or a folder's class subfolders)
    holdout: int = 297  # digits / folder: images kept out of training (cifar10: its test split)
    split_seed: int = 0  # seed of the train / held-out split

    CHECKS: ClassVar[dict] = {
        "name": OneOf(tuple(DATA_SETS)),
        "resolution": Range(1, MAX_RESOLUTION),
        "channels": OneOf((0, 1, 3)),
        "num_classes": Range(-1),
        "holdout": NON_NEGATIVE,
        "split_seed": Range(0, 2**63 - 1),
    }


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

    CHECKS: ClassVar[dict] = {
        "arch": OneOf(ARCHS),
        "model_channels": Range(1, MAX_WIDTH),
        "channel_mult": Each(Range(1, 64)),
        "num_blocks": Range(1, 64),
        "attn_resolutions": Each(Range(1, MAX_RESOLUTION), allow_empty=True),
        "num_heads": Range(1, 1024),
        "patch_size": Range(1, MAX_RESOLUTION),
        "noise_channels": Range(2, MAX_WIDTH),
        "augment_dim": Range(0, 64),
        "cond_mode": OneOf(COND_MODES),
        "dropout": Range(0, 1, high_open=True),
    }


@dataclass
class DiffusionConfig:
    objective: str = "edm"  # "edm" | "ddpm" (eps) | "v" | "x0" | "iddpm" (learned variance)
    schedule: str = "linear"  # discrete schedule for ddpm / v: "linear" | "cosine"
    num_timesteps: int = 1000  # discrete steps T for ddpm / v
    sigma_data: float = 0.5  # edm: data standard deviation in the preconditioning
    p_mean: float = -1.2  # edm: mean of log sigma during training
    p_std: float = 1.2  # edm: std of log sigma during training
    sampler: str = "heun"  # "heun" | "ddim" | "ddpm" | "iddpm" (learned variance, respaced)
    guidance: float = 1.0  # classifier-free guidance scale at sampling (1: none)
    sample_steps: int = 18  # sampling steps
    loss_reduction: str = "mean"  # edm / ddpm / v: "mean" | "sum" (per image; EDM's loop)
    decoder_nll: str = "tanh"  # iddpm, t = 0: "tanh" (improved-diffusion's CDF) | "exact"

    CHECKS: ClassVar[dict] = {
        "objective": OneOf((*OBJECTIVES, "iddpm")),
        "schedule": OneOf(tuple(SCHEDULES)),
        "num_timesteps": Range(2, 1_000_000),
        "sigma_data": POSITIVE,
        "p_mean": Range(-20, 20),
        "p_std": POSITIVE,
        "sampler": OneOf((*SAMPLERS, *LEARNED_VARIANCE_SAMPLERS)),
        "guidance": NON_NEGATIVE,
        "sample_steps": Range(1, 100_000),
        "loss_reduction": OneOf(LOSS_REDUCTIONS),
        "decoder_nll": OneOf(DECODER_NLLS),
    }


@dataclass
class ImageTrainConfig(TrainConfig):
    """The generic loop's settings plus what image diffusion adds."""

    augment_p: float = 0.0  # EDM geometric augmentation probability (net.augment_dim: 9)
    label_dropout: float = 0.0  # fraction of labels replaced by the null class (for guidance)
    channels_last: bool = True  # NHWC memory layout (about 20% faster convs on CPU and GPU)

    CHECKS: ClassVar[dict] = {
        **TrainConfig.CHECKS,
        "augment_p": FRACTION,
        "label_dropout": Range(0, 1, high_open=True),
    }


@dataclass
class Config:
    name: str = "digits"  # run name, used for the default output folder
    data: DataConfig = field(default_factory=DataConfig)
    net: NetConfig = field(default_factory=NetConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: ImageTrainConfig = field(default_factory=ImageTrainConfig)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """An image-diffusion Config from a YAML file and key=value overrides."""
    return read_config(Config, path, overrides)


def config_from_json(text: str) -> Config:
    """Rebuild a Config stored as JSON (checkpoint metadata)."""
    return from_dict(Config, json.loads(text))
