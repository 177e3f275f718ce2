"""Checks of an image config and of sampling options, made before anything is built or sampled.

Values and their combinations are checked when a config is built (core.config.Checked).
What depends on the built network is checked here: the sizes of the network and its LoRA,
counted on torch's meta device (shapes only, no memory), the sampling options against the
model, and the parameter counts of `condlora info`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from condlora.core.errors import CondloraError, ConfigError
from condlora.diffusion.samplers import LEARNED_VARIANCE_SAMPLERS
from condlora.image.build import (
    build_denoiser,
    build_net,
    is_text_config,
    lora_config,
    num_classes,
)
from condlora.image.config import Config, load_config
from condlora.lora import count_lora_parameters, inject, lora_layers

MAX_PARAMETERS = 2_000_000_000  # 8 GB of fp32 weights; the paper's largest net has 58 M
MAX_SAMPLE_BYTES = 16 * 2**30  # samples are held in memory as float32
MAX_SEED = 2**63 - 1  # what torch.manual_seed takes
MAX_SAMPLE_STEPS = 100_000


def check_model_size(cfg: Config) -> int:
    """Parameters of the configured network with its LoRA, counted without allocating.

    ConfigError if the LoRA rank exceeds the rank of an adapted layer (its update would be
    larger than the layer) or the whole model exceeds MAX_PARAMETERS.
    """
    with torch.device("meta"):
        net = build_net(cfg)
        if cfg.lora.method != "none":
            inject(net, lora_config(cfg))
    for name, layer in lora_layers(net).items():
        weight = layer.base_layer.weight
        d_out, d_in = weight.shape[0], weight[0].numel()
        if cfg.lora.rank > min(d_in, d_out):
            raise ConfigError(
                f"lora.rank {cfg.lora.rank} exceeds the rank of layer {name} ({d_in} -> "
                f"{d_out} features, rank at most {min(d_in, d_out)}): lower lora.rank"
            )
    count = sum(p.numel() for p in net.parameters())
    if count > MAX_PARAMETERS:
        raise ConfigError(
            f"the configured network has {count:,} parameters, more than {MAX_PARAMETERS:,} "
            "(check net.model_channels, net.channel_mult, lora.num_bases, lora.num_time_rows)"
        )
    return count


def check_seed(seed: int, what: str = "--seed") -> None:
    """CondloraError unless 0 <= seed <= 2^63 - 1."""
    if not 0 <= seed <= MAX_SEED:
        raise CondloraError(f"{what} must be in 0..{MAX_SEED}, got {seed}")


def check_sample_count(cfg: Config, num: int, least: int = 1, what: str = "--num") -> None:
    """CondloraError unless `least` <= num and the samples fit in MAX_SAMPLE_BYTES."""
    d = cfg.data
    per_image = 4 * d.channels * d.resolution**2
    most = MAX_SAMPLE_BYTES // per_image
    if not least <= num <= most:
        raise CondloraError(
            f"{what} must be at least {least} and at most {most:,} "
            f"({d.resolution}x{d.resolution} images in memory), got {num}"
        )


def _check_guidance(cfg: Config, scale: float, sampler: str) -> None:
    """CondloraError if classifier-free guidance at `scale` cannot work for this model."""
    if not math.isfinite(scale) or scale < 0:
        raise CondloraError(f"--guidance must be a finite number >= 0, got {scale}")
    if scale == 1.0:
        return  # no guidance
    if num_classes(cfg) == 0 and not is_text_config(cfg):
        raise CondloraError(
            f"guidance {scale:g} needs a class-conditional or text model; this one is unconditional"
        )
    if cfg.train.label_dropout <= 0:
        raise CondloraError(
            f"guidance {scale:g} needs a model trained with label dropout, but this run has "
            "train.label_dropout 0, so it never learned the unconditional prediction that "
            "guidance mixes in: retrain with train.label_dropout (e.g. 0.1), or use guidance 1"
        )
    if sampler in LEARNED_VARIANCE_SAMPLERS:
        raise CondloraError(
            f"guidance does not combine with the {sampler} sampler (it samples with the "
            "model's learned variance, which guidance does not give): use --sampler ddpm, "
            "ddim or heun"
        )


def sampling_config(
    cfg: Config,
    steps: int | None = None,
    sampler: str | None = None,
    guidance: float | None = None,
) -> Config:
    """The run's config with --guidance applied, after checking the sampling options."""
    if steps is not None and not 1 <= steps <= MAX_SAMPLE_STEPS:
        raise CondloraError(f"--steps must be in 1..{MAX_SAMPLE_STEPS}, got {steps}")
    if guidance is not None:
        cfg = dataclasses.replace(
            cfg, diffusion=dataclasses.replace(cfg.diffusion, guidance=guidance)
        )
    _check_guidance(cfg, cfg.diffusion.guidance, sampler or cfg.diffusion.sampler)
    return cfg


# Module-name parts that make up the backbone's conditioning path: the noise / class
# embedding and the residual blocks' embedding projections (scale-and-shift), for
# SmallUNet, ADMUNet and DDPMppUNet.
CONDITIONING_MODULES = (
    *("embed", "emb_proj"),
    *("time_embed", "label_emb", "emb_layers"),
    *("map_label", "map_augment", "map_layer0", "map_layer1", "affine"),
)


def _is_conditioning(name: str) -> bool:
    return any(part in CONDITIONING_MODULES for part in name.split("."))


def parameter_summary(model: nn.Module) -> dict[str, int]:
    """{"parameters": total, "lora parameters": ..., "conditioning parameters": ...}."""
    total = sum(p.numel() for p in model.parameters())
    lora = count_lora_parameters(model)
    cond = sum(p.numel() for n, p in model.named_parameters() if _is_conditioning(n))
    return {"parameters": total, "lora parameters": lora, "conditioning parameters": cond}


def info_lines(path: str | Path, overrides: list[str] | None = None) -> list[str]:
    """`condlora info` for an image config: its parameter counts, one "key: value" a line."""
    cfg = load_config(path, overrides)
    check_model_size(cfg)  # a model too large is refused before it is allocated
    model = build_denoiser(cfg)
    return [f"{key}: {value}" for key, value in parameter_summary(model).items()]
