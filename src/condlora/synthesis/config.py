"""SynthConfig: the settings of a LoRA synthesis model (VAE, latent prior, baselines, encoder).

A YAML file holds only what differs from these defaults (`condlora.core.config`); it is
marked `kind: synthesis` so that `condlora info` knows it from an image-diffusion config.
The widths that the data decide (D, E, the prior's input) are filled in by `resolve`.

Each training stage records its own config in its checkpoint: `VAERunConfig` and
`PriorRunConfig` (the stage's part of SynthConfig plus its `train` settings and the
collection's layout signature), so a checkpoint rebuilds its network exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from condlora.core.config import (
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    Checked,
    Each,
    OneOf,
    Range,
    read_config,
    read_yaml,
)
from condlora.core.errors import ConfigError
from condlora.nets.vector import VectorNetConfig
from condlora.train.config import TrainConfig

KIND = "synthesis"
SYNTH_METHODS = ("diffusion", "pca", "nearest")
PRIOR_OBJECTIVES = ("v", "x0")
PRIOR_SAMPLERS = ("ddim", "ddpm", "heun")
PRIOR_SCHEDULES = ("linear", "cosine")


@dataclass
class VAEConfig(Checked):
    """Settings of a LoRAVAE; enough to rebuild it exactly."""

    dim: int = 0  # D, length of the LoRA vectors; 0: set from the dataset before building
    latent: int = 512  # width of the latent z
    hidden: int = 1024  # residual stream width of the encoder and of the decoder
    depth: int = 2  # residual blocks in the encoder, and as many in the decoder
    mlp_ratio: float = 2.0  # hidden width of each block's MLP = mlp_ratio * hidden
    dropout: float = 0.0  # dropout inside each block's MLP
    beta: float = 0.01  # weight of the KL term (< 1)

    CHECKS: ClassVar[dict] = {
        "dim": Range(0, 2**40),
        **{name: Range(1, 2**24) for name in ("latent", "hidden", "depth")},
        "mlp_ratio": Range(0, 1024, low_open=True),
        "dropout": Range(0, 1, high_open=True),
        "beta": NON_NEGATIVE,
    }


@dataclass
class PriorConfig(Checked):
    """The diffusion prior over (standardised) VAE latents or raw standardised vectors."""

    net: VectorNetConfig = field(default_factory=VectorNetConfig)  # dim, cond_dim: from data
    objective: str = "v"  # "v" (v-prediction) | "x0" (x0-prediction)
    schedule: str = "linear"  # beta schedule of the discrete diffusion: "linear" | "cosine"
    num_timesteps: int = 1000  # discrete diffusion steps T
    cond_dropout: float = 0.1  # training rows whose condition is the null embedding (for CFG)
    uc_bases: int = 8  # net.cond_mode "uc_lora": number of UC-LoRA bases m per layer
    sampler: str = "ddim"  # "ddim" | "ddpm" | "heun"
    steps: int = 50  # sampling steps
    guidance: float = 1.0  # classifier-free guidance scale g (1: none; needs cond_dropout > 0)

    CHECKS: ClassVar[dict] = {
        "objective": OneOf(PRIOR_OBJECTIVES),
        "schedule": OneOf(PRIOR_SCHEDULES),
        "num_timesteps": Range(2, 1_000_000),
        "cond_dropout": Range(0, 1, high_open=True),
        "uc_bases": Range(1, 2**16),
        "sampler": OneOf(PRIOR_SAMPLERS),
        "steps": Range(1, 100_000),
        "guidance": NON_NEGATIVE,
    }

    def check(self, key: Callable[[str], str]) -> None:
        """Guidance needs an unconditional model to guide by."""
        if self.guidance != 1.0 and self.cond_dropout <= 0:
            raise ConfigError(
                f"{key('guidance')} {self.guidance} needs {key('cond_dropout')} > 0 "
                "(an unconditional model to guide by)"
            )


@dataclass
class BaselineConfig(Checked):
    """The non-generative baselines: PCA + ridge, and the nearest LoRA."""

    components: int = 64  # "pca": principal components kept (at most min(N, D))
    ridge: float = 1.0  # "pca": ridge penalty of the embedding -> PC-coefficient map
    power_iters: int = 4  # "pca": power iterations of the streamed randomized SVD
    oversample: int = 16  # "pca": extra random directions of the randomized SVD

    CHECKS: ClassVar[dict] = {
        "components": Range(1, 2**20),
        "ridge": NON_NEGATIVE,
        "power_iters": Range(0, 100),
        "oversample": Range(0, 2**20),
    }


@dataclass
class EncoderConfig(Checked):
    """How `synth generate --images DIR` turns a subject's images into its embedding."""

    kind: str = "embeddings"  # "embeddings" (none: precomputed) | "onnx-face" | a registered kind
    path: str = ""  # "onnx-face": the insightface-style .onnx model file
    detector: str = ""  # "onnx-face": MTCNN's folder (pnet.pt ...): detect, align; "": crops


@dataclass
class ZooConfig(Checked):
    """Settings of `condlora synth zoo`: one plain LoRA per subject on a frozen base."""

    rank: int = 1  # LoRA rank (weights2weights: 1)
    alpha: float = 1.0  # peft lora_alpha (scale alpha / rank)
    targets: tuple[str, ...] = ("qkv",)  # module names or suffixes (diffusers: to_q, to_v)
    steps: int = 200  # fine-tuning steps of every subject
    lr: float = 5e-3  # Adam learning rate (constant, then linear decay to 0 over the last half)
    images_per_subject: int = 4  # images of each subject in every step
    subjects_per_batch: int = 16  # subjects fine-tuned together (per-sample LoRA in one batch)
    log_sigma_mean: float | None = None  # EDM base: mean of ln(sigma) while fine-tuning (None:
    # the base's own training distribution)
    seed: int = 0  # draws of images, noise levels and noise (the same for every subject)

    CHECKS: ClassVar[dict] = {
        **{name: Range(1, 10**7) for name in ("rank", "steps", "images_per_subject")},
        "subjects_per_batch": Range(1, 10**6),
        "alpha": POSITIVE,
        "lr": POSITIVE,
        "targets": Each(),
        "seed": SEED,
    }


@dataclass
class SynthConfig(Checked):
    """A LoRA synthesis model: data, VAE, prior, baselines, encoder and both training runs."""

    kind: str = KIND  # marks a synthesis config (`condlora info` dispatches on it)
    name: str = "synth"  # run name (default output folder runs/<name>)
    dataset: str = ""  # dataset file written by `condlora synth collect`
    dim: int = 0  # D, numbers per LoRA vector; 0: from the dataset
    cond_dim: int = 0  # E, width of the condition embeddings; 0: from the dataset
    method: str = "diffusion"  # "diffusion" | "pca" (PCA + ridge) | "nearest" (by cosine)
    use_vae: bool = True  # diffusion on VAE latents; false: on the raw standardised vectors
    std_floor: float = 1e-3  # each coordinate's std floored at this fraction of the mean std
    vae: VAEConfig = field(default_factory=VAEConfig)  # vae.dim: from `dim`
    prior: PriorConfig = field(default_factory=PriorConfig)  # the latent diffusion prior
    baseline: BaselineConfig = field(default_factory=BaselineConfig)  # method pca / nearest
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # images -> embedding
    vae_train: TrainConfig = field(default_factory=TrainConfig)  # the VAE's training loop
    prior_train: TrainConfig = field(default_factory=TrainConfig)  # the prior's training loop

    CHECKS: ClassVar[dict] = {
        "kind": OneOf((KIND,)),
        "method": OneOf(SYNTH_METHODS),
        "dim": Range(0, 2**40),  # 0: from the dataset
        "cond_dim": Range(0, 2**24),
        "std_floor": POSITIVE,
    }


@dataclass
class VAERunConfig(Checked):
    """What a VAE checkpoint records (the training loop's config for the VAE stage)."""

    name: str = "synth"  # run name
    dataset: str = ""  # the dataset it was trained on (may move: not checked on resume)
    layout: str = ""  # signature of the collection's layout (FlatSpec)
    std_floor: float = 1e-3  # as SynthConfig.std_floor
    vae: VAEConfig = field(default_factory=VAEConfig)  # the network
    train: TrainConfig = field(default_factory=TrainConfig)  # the loop


@dataclass
class PriorRunConfig(Checked):
    """What a prior checkpoint records (the training loop's config for the prior stage)."""

    name: str = "synth"  # run name
    dataset: str = ""  # the dataset it was trained on (may move: not checked on resume)
    layout: str = ""  # signature of the collection's layout (FlatSpec)
    use_vae: bool = True  # the prior models VAE latents (else raw standardised vectors)
    prior: PriorConfig = field(default_factory=PriorConfig)  # net and diffusion settings
    train: TrainConfig = field(default_factory=TrainConfig)  # the loop


def is_synthesis_config(path: str | Path) -> bool:
    """True if a YAML config file (with its `base:` chain) says `kind: synthesis`."""
    return read_yaml(path).get("kind") == KIND


def load_synth_config(path: str | Path | None, overrides: list[str] | None = None) -> SynthConfig:
    """A SynthConfig from a YAML file (or the defaults, path None) and key=value overrides."""
    return read_config(SynthConfig, path, overrides)


def _agree(name: str, stated: int, found: int, where: str) -> int:
    """`found` (from the data), after checking that a stated non-zero value agrees."""
    if stated and found and stated != found:
        raise ConfigError(f"the config says {name} = {stated}, but {where} has {found}")
    return stated or found


def resolve(cfg: SynthConfig, dim: int = 0, cond_dim: int = 0, where: str = "") -> SynthConfig:
    """The config with D and E from the data filled in everywhere they are used.

    dim / cond_dim: the dataset's D and E (0: unknown, e.g. no dataset at hand). The prior's
    net.dim becomes the VAE latent (or D without the VAE) and net.cond_dim becomes E.
    """
    where = where or "the dataset"
    d = _agree("dim", cfg.dim, dim, where)
    d = _agree("vae.dim", cfg.vae.dim, d, "dim") if cfg.vae.dim else d
    e = _agree("cond_dim", cfg.cond_dim, cond_dim, where)
    if not d:
        raise ConfigError("the LoRA vector length is unknown: give --dataset or set dim")
    vae = dataclasses.replace(cfg.vae, dim=d)
    prior_dim = vae.latent if cfg.use_vae else d
    net = dataclasses.replace(cfg.prior.net, dim=prior_dim, cond_dim=e or cfg.prior.net.cond_dim)
    prior = dataclasses.replace(cfg.prior, net=net)
    return dataclasses.replace(cfg, dim=d, cond_dim=e, vae=vae, prior=prior)


def vae_run_config(cfg: SynthConfig, layout: str) -> VAERunConfig:
    """The VAE stage's part of a resolved SynthConfig."""
    return VAERunConfig(cfg.name, cfg.dataset, layout, cfg.std_floor, cfg.vae, cfg.vae_train)


def prior_run_config(cfg: SynthConfig, layout: str) -> PriorRunConfig:
    """The prior stage's part of a resolved SynthConfig."""
    return PriorRunConfig(cfg.name, cfg.dataset, layout, cfg.use_vae, cfg.prior, cfg.prior_train)
