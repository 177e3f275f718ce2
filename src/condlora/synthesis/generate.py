"""Generation: embedding -> prior sample -> VAE decode -> un-standardise -> LoRA.

    model = SynthModel.load("DIR")                  # once; then many calls
    vectors = model.vectors(embeddings, num=1)      # (N, num, D) raw LoRA vectors
    weights = model.lora(vectors[0, 0])             # LoRAWeights (canonical layout, scale 1)
    write_lora(weights, "out", "peft")

`generate_vectors` and `vectors_to_lora` do the same from a folder path in one call. The
baselines of the folder's `method` answer through the same calls ("pca": the ridge
prediction, repeated num times; "nearest": the num nearest LoRAs of the collection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from condlora.core.errors import ConfigError, DataError
from condlora.core.files import check_output_folder
from condlora.diffusion import Denoiser, EmbeddingGuidedDenoiser, sample
from condlora.image.checks import MAX_SAMPLE_BYTES
from condlora.lora.formats import LoRAWeights, write_loras
from condlora.synthesis.baselines import Nearest, PCARidge
from condlora.synthesis.config import PriorRunConfig
from condlora.synthesis.model import (
    BASELINE_FILE,
    COLLECTION_FILE,
    PRIOR_DIR,
    LoRAVAE,
    ModelInfo,
    build_prior,
)
from condlora.synthesis.training import PRIOR_KIND, load_vae
from condlora.train.checkpoint import CHECKPOINT_NAME, EMA_NAME, load_ema


def load_prior(folder: Path, device: torch.device | str) -> tuple[PriorRunConfig, Denoiser]:
    """(run config, prior denoiser with EMA weights, eval mode) of a model folder."""
    run = folder / PRIOR_DIR
    if not any((run / name).is_file() for name in (EMA_NAME, CHECKPOINT_NAME)):
        raise DataError(f"{folder} has no trained prior ({PRIOR_DIR}/{EMA_NAME})")
    run_cfg, _, denoiser = load_ema(run, PriorRunConfig, PRIOR_KIND, lambda c: build_prior(c.prior))
    return run_cfg, denoiser.to(device).requires_grad_(False)


@dataclass
class SynthModel:
    """A loaded synthesis model folder: whatever its method needs to generate."""

    folder: Path  # the model folder
    info: ModelInfo  # layout, statistics, embedding width, method
    device: torch.device  # where sampling and decoding run
    prior_cfg: PriorRunConfig | None = None  # method "diffusion"
    prior: Denoiser | None = None  # method "diffusion"
    vae: LoRAVAE | None = None  # method "diffusion" with use_vae
    pca: PCARidge | None = None  # method "pca"
    nearest: Nearest | None = None  # method "nearest"

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str = "cpu") -> SynthModel:
        """Load a folder written by `synth train*`; DataError if a part is missing or foreign."""
        folder, device = Path(folder), torch.device(device)
        info = ModelInfo.read(folder)
        model = cls(folder, info, device)
        if info.method == "pca":
            model.pca = PCARidge.read(folder / BASELINE_FILE)
        elif info.method == "nearest":
            model.nearest = Nearest(folder / COLLECTION_FILE)
        else:
            model.prior_cfg, model.prior = load_prior(folder, device)
            model._check_layout(model.prior_cfg.layout, "prior")
            if model.prior_cfg.use_vae:
                vae_cfg, model.vae = load_vae(folder, device)
                model._check_layout(vae_cfg.layout, "VAE")
                if info.latent_mean is None:
                    raise DataError(f"{folder}: the model file lacks the latent statistics")
        return model

    def _check_layout(self, layout: str, part: str) -> None:
        if layout != self.info.signature:
            raise DataError(
                f"{self.folder}: its {part} was trained on a collection of another layout "
                f"than the model file's ({self.info.spec.size} numbers per LoRA)"
            )

    def check_embeddings(self, embeddings: Tensor) -> Tensor:
        """Embeddings as a float (N, E) tensor; DataError on another width or non-finite values."""
        e = torch.as_tensor(embeddings).float()
        e = e[None] if e.dim() == 1 else e
        want = self.info.cond_dim
        if e.dim() != 2 or (want and e.shape[1] != want):
            raise DataError(
                f"embedding of shape {tuple(e.shape)} does not fit {self.folder}: it was trained "
                f"on {want}-d embeddings"
            )
        if not torch.isfinite(e).all():
            raise DataError("the embedding has NaN or inf values")
        return e

    def guidance_scale(self, guidance: float | None) -> float:
        """The guidance scale to use; ConfigError if the prior cannot be guided."""
        assert self.prior_cfg is not None
        g = self.prior_cfg.prior.guidance if guidance is None else float(guidance)
        if not math.isfinite(g) or g < 0:
            raise ConfigError(f"--guidance must be a finite number >= 0, got {g}")
        if g != 1.0 and self.prior_cfg.prior.cond_dropout <= 0:
            raise ConfigError(
                f"--guidance {g}: the prior in {self.folder} was trained without condition "
                "dropout (prior.cond_dropout = 0), so it has no unconditional model to guide by"
            )
        if g != 1.0 and self.prior_cfg.prior.net.cond_mode == "none":
            raise ConfigError(f"--guidance {g}: the prior in {self.folder} is unconditional")
        return g

    def check_count(self, num: int, rows: int = 1) -> None:
        """ConfigError unless 1 <= num and `num` LoRAs per row fit in MAX_SAMPLE_BYTES."""
        latent = self.prior_cfg.prior.net.dim if self.prior_cfg else 0
        most = MAX_SAMPLE_BYTES // (4 * max(rows, 1) * (self.info.spec.size + latent))
        if not 1 <= num <= most:
            raise ConfigError(
                f"--num must be at least 1 and at most {most:,} (LoRAs of "
                f"{self.info.spec.size:,} numbers held in memory), got {num}"
            )

    @torch.no_grad()
    def _sample_prior(self, e: Tensor, guidance: float | None, seed: int) -> Tensor:
        """Standardised vectors (len(e), D) from the prior (and the VAE decoder)."""
        assert self.prior is not None and self.prior_cfg is not None
        p = self.prior_cfg.prior
        g = self.guidance_scale(guidance)
        conditional = p.net.cond_mode != "none"
        denoiser = EmbeddingGuidedDenoiser(self.prior, g) if g != 1.0 else self.prior
        cond = {"embedding": e.to(self.device)} if conditional else {}
        generator = torch.Generator().manual_seed(seed)
        shape = (len(e), p.net.dim)
        z = sample(denoiser, shape, p.sampler, p.steps, generator, self.device, **cond)
        if self.vae is None:
            return z
        latent_mean, latent_std = self.info.latent_mean, self.info.latent_std
        z = z * latent_std.to(self.device) + latent_mean.to(self.device)
        return self.vae.decode(z)

    def vectors(
        self, embeddings: Tensor, num: int = 1, guidance: float | None = None, seed: int = 0
    ) -> Tensor:
        """Raw LoRA vectors (N, num, D) for embeddings (N, E) (or one (E,)): `num` per row."""
        e = self.check_embeddings(embeddings)
        self.check_count(num, len(e))
        if self.nearest is not None:
            return self.nearest.vectors(e, num)
        if self.pca is not None:
            x = self.pca.predict(e)[:, None].expand(-1, num, -1)
        else:
            x = self._sample_prior(e.repeat_interleave(num, dim=0), guidance, seed)
            x = x.reshape(len(e), num, -1)
        return self.info.unstandardise(x.cpu())

    def lora(self, vector: Tensor) -> LoRAWeights:
        """A raw vector (D,) as a LoRA (modules of the collection's layout, scale 1)."""
        return self.info.spec.unflatten(vector.detach().float().cpu())


def generate_vectors(
    model_dir: str | Path,
    embeddings: Tensor,
    num: int = 1,
    guidance: float | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Raw LoRA vectors (N, num, D) for embeddings (N, E) from a model folder (loads it)."""
    return SynthModel.load(model_dir, device).vectors(embeddings, num, guidance, seed)


def vectors_to_lora(model: str | Path | SynthModel, vector: Tensor) -> LoRAWeights:
    """A raw vector (D,) from `generate_vectors` as LoRAWeights (write it with write_lora)."""
    model = model if isinstance(model, SynthModel) else SynthModel.load(model)
    return model.lora(vector)


def output_paths(out: str | Path, num: int) -> list[Path]:
    """out itself for one LoRA; out_0, out_1, ... (suffix kept) for several."""
    out = Path(out)
    if num == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(num)]


def write_generated(
    model: SynthModel,
    embedding: Tensor,
    out: str | Path,
    layout: str = "peft",
    num: int = 1,
    guidance: float | None = None,
    seed: int = 0,
) -> list[Path]:
    """Generate `num` LoRAs for one embedding and write them (see `output_paths`)."""
    model.check_count(num)
    for path in output_paths(out, num):  # before the sampling: a place that cannot be written
        check_output_folder(path.parent, "the folder of --out")
    vectors = model.vectors(embedding, num, guidance, seed)
    if vectors.shape[0] != 1:
        raise DataError(f"one embedding per generate call, got {vectors.shape[0]}")
    loras = [model.lora(v) for v in vectors[0]]
    for weights in loras:  # check before writing anything
        weights.check_finite("generated LoRA")
    return write_loras(zip(loras, output_paths(out, num), strict=True), layout)
