"""The image-diffusion run config: dataclasses whose defaults a YAML file overrides.

See `condlora.core.config` for the file format (override-only YAML, `base:` files,
dotted key=value overrides, unknown keys refused).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from condlora.core.config import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Checked,
    Each,
    OneOf,
    Range,
    from_dict,
    read_config,
)
from condlora.core.errors import ConfigError
from condlora.data import folder_layout
from condlora.data.augment import AUGMENT_DIM
from condlora.diffusion.precond import BETA_RANGES, LOSS_REDUCTIONS, OBJECTIVES, SCHEDULES
from condlora.diffusion.samplers import LEARNED_VARIANCE_SAMPLERS, SAMPLERS
from condlora.lora import LoRAConfig
from condlora.nets.unet import COND_MODES
from condlora.train.config import TrainConfig

DATA_SETS = {"digits": (1, 10), "cifar10": (3, 10), "folder": (3, None)}  # channels, classes
ARCHS = ("small_unet", "adm", "ddpmpp", "diffusers")
DECODER_NLLS = ("tanh", "exact")  # diffusion.decoder_nll
LORA_METHODS_SEEING_CLASS = ("class", "time+class", "uc")  # what lora_only needs with classes
MAX_RESOLUTION = 4096  # image side
MAX_WIDTH = 16384  # net.model_channels


@dataclass
class DataConfig(Checked):
    name: str = "digits"  # "digits" (embedded) | "cifar10" (python format) | "folder" (images)
    path: str | None = None  # cifar10: cifar-10-batches-py or the .tar.gz; folder: the folder
    resolution: int = 16  # image side (digits: upsampled from 8; cifar10: 32; folder: resized)
    channels: int = 0  # image channels (0: the data set's own: digits 1, cifar10 3, folder 3)
    num_classes: int = -1  # classes (-1: the data set's own: 10, or a folder's class subfolders)
    holdout: int = 297  # digits / folder: images kept out of training (cifar10: its test split)
    split_seed: int = 0  # seed of the train / held-out split
    cache_latents: bool = True  # net.arch diffusers with a vae/: encode the images once
    # (the posterior's mean), else per batch (a draw from the posterior)

    CHECKS: ClassVar[dict] = {
        "name": OneOf(tuple(DATA_SETS)),
        "resolution": Range(1, MAX_RESOLUTION),
        "channels": OneOf((0, 1, 3)),
        "num_classes": Range(-1),
        "holdout": NON_NEGATIVE,
        "split_seed": Range(0, 2**63 - 1),
    }

    def check(self, key: Callable[[str], str]) -> None:
        """A path where the data set needs one, CIFAR-10's own size."""
        if self.name != "digits" and not self.path:
            raise ConfigError(
                f"{key('name')} {self.name} needs {key('path')} (where the data lies)"
            )
        if self.name == "cifar10" and self.resolution != 32:
            raise ConfigError(f"cifar10 images are 32x32: set {key('resolution')}: 32")

    def __post_init__(self) -> None:
        """Checked, then resolved: channels and classes from the data set (0 / -1: its own).

        A folder's classes are its subfolders, counted here once; runs store the resolved
        config, so a finished run rebuilds without the data.
        """
        super().__post_init__()
        channels, classes = DATA_SETS[self.name]
        self.channels = self.channels or channels
        if self.num_classes < 0:
            self.num_classes = len(folder_layout(self.path)[2]) if classes is None else classes


@dataclass
class NetConfig(Checked):
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
    pretrained: str | None = None  # arch diffusers: a local UNet2DModel or pipeline folder
    train_base: bool = False  # arch diffusers: train the U-Net's own weights too (else frozen)
    gradient_checkpointing: bool = False  # arch diffusers: recompute block activations in the
    # backward pass (less memory, about a third more time)

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
class DiffusionConfig(Checked):
    objective: str = "edm"  # "edm" | "ddpm" (eps) | "v" | "x0" | "iddpm" (learned variance)
    schedule: str = "linear"  # discrete schedule for ddpm / v: "linear" | "cosine"
    num_timesteps: int = 1000  # discrete steps T for ddpm / v
    beta_start: float | None = None  # linear / scaled_linear: the first beta (None: the
    beta_end: float | None = None  # schedule's own, 1e-4..0.02 or SD's 0.00085..0.012)
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
        "beta_start": Range(0, 1, low_open=True, high_open=True),
        "beta_end": Range(0, 1, low_open=True, high_open=True),
        "sigma_data": POSITIVE,
        "p_mean": Range(-20, 20),
        "p_std": POSITIVE,
        "sampler": OneOf((*SAMPLERS, *LEARNED_VARIANCE_SAMPLERS)),
        "guidance": NON_NEGATIVE,
        "sample_steps": Range(1, 100_000),
        "loss_reduction": OneOf(LOSS_REDUCTIONS),
        "decoder_nll": OneOf(DECODER_NLLS),
    }

    def check(self, key: Callable[[str], str]) -> None:
        """The iddpm objective takes improved-diffusion's mean loss; beta_start and beta_end
        go with a linear or scaled_linear schedule of discrete steps."""
        betas = self.beta_start is not None or self.beta_end is not None
        if betas and (self.schedule not in BETA_RANGES or self.objective == "edm"):
            raise ConfigError(
                f"{key('beta_start')} and {key('beta_end')} go with {key('schedule')} "
                f"{' or '.join(BETA_RANGES)} and a discrete objective (ddpm, v, x0, iddpm)"
            )
        if self.objective == "iddpm" and self.loss_reduction != "mean":
            raise ConfigError(
                f"{key('loss_reduction')} applies to edm, ddpm and v: the iddpm objective takes "
                "improved-diffusion's mean over pixels (set loss_reduction: mean)"
            )


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
class Config(Checked):
    name: str = "digits"  # run name, used for the default output folder
    data: DataConfig = field(default_factory=DataConfig)
    net: NetConfig = field(default_factory=NetConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: ImageTrainConfig = field(default_factory=ImageTrainConfig)

    def check(self, key: Callable[[str], str]) -> None:
        """Rules across the net, LoRA, data and training settings."""
        net, method = self.net, self.lora.method
        if (net.arch == "diffusers") != (net.pretrained is not None):
            raise ConfigError("net.pretrained (a diffusers folder) goes with net.arch diffusers")
        if net.train_base and net.arch != "diffusers":
            raise ConfigError("net.train_base goes with net.arch diffusers (others train all)")
        if net.gradient_checkpointing and net.arch != "diffusers":
            raise ConfigError("net.gradient_checkpointing goes with net.arch diffusers")
        if net.cond_mode != "scale_shift" and method == "none":
            raise ConfigError(
                f"{key('net')}.cond_mode '{net.cond_mode}' adds LoRA conditioning: set "
                f"{key('lora')}.method (time, class, uc, time+class)"
            )
        if net.augment_dim and net.arch != "ddpmpp":
            raise ConfigError("net.augment_dim needs net.arch ddpmpp (the net with that label)")
        if self.train.augment_p > 0 and net.augment_dim != AUGMENT_DIM:
            raise ConfigError(
                f"train.augment_p > 0 feeds {AUGMENT_DIM}-d augmentation labels to the net: "
                f"set net.arch ddpmpp and net.augment_dim {AUGMENT_DIM}"
            )
        if net.class_conditional and self.data.num_classes == 0:
            raise ConfigError(
                f"{self.data.path} has no class subfolders: set net.class_conditional: false"
            )
        lora_only = net.cond_mode == "lora_only"
        if lora_only and net.arch == "adm" and "uc" in method.split("+"):
            raise ConfigError(
                "net.arch adm in cond_mode lora_only has no embedding MLP for UC-LoRA to read: "
                "use lora.method time, class or time+class"
            )
        if lora_only and net.class_conditional and method not in LORA_METHODS_SEEING_CLASS:
            raise ConfigError(
                f"with net.cond_mode lora_only the class reaches the model only through LoRA, "
                f"but lora.method '{method}' does not see it: use one of "
                f"{', '.join(LORA_METHODS_SEEING_CLASS)}"
            )


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """An image-diffusion Config from a YAML file and key=value overrides."""
    return read_config(Config, path, overrides)


def config_from_json(text: str) -> Config:
    """Rebuild a Config stored as JSON (checkpoint metadata)."""
    return from_dict(Config, json.loads(text))
