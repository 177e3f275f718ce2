"""The synthesis model folder: what `synth generate` needs, without the dataset.

    DIR/model.safetensors   layout spec, the collection's mean / floored std, latent stats,
                            embedding width, method, encoder settings (ModelInfo)
    DIR/config.yaml         the SynthConfig it was trained with (for the record)
    DIR/vae/                the VAE's training run (checkpoint.safetensors, metrics, loss.png)
    DIR/prior/              the prior's training run (same files)
    DIR/baseline.safetensors    method "pca": components and the ridge map
    DIR/collection.safetensors  method "nearest": a copy of the collection

Standardised vectors are (x - mean) / std per coordinate, std floored (SynthConfig.std_floor);
the prior models VAE latent means standardised the same way with their own statistics.
LoRAVAE, the VAE over standardised LoRA vectors (arXiv 2412.02352, sec. 3):

    encoder  x (B, D) -> ResMLP -> (mean, logvar), each (B, latent)
    sample   z = mean + exp(logvar / 2) * n,  n ~ N(0, I)        (reparametrisation)
    decoder  z -> ResMLP -> x_hat (B, D)
    loss     recon + beta * kl
             recon = mean over batch and coordinates of (x_hat - x)^2
             kl    = mean over batch and latent units of KL(N(mean, var) || N(0, 1))
                   = mean of (mean^2 + var - 1 - logvar) / 2

Both terms are per-number means, so beta weighs one latent unit against one coordinate
whatever D and latent are; beta < 1 keeps reconstructions sharp (the paper's choice).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from condlora.core.errors import ConfigError, DataError
from condlora.core.safetensors_io import read_weights, write_weights
from condlora.diffusion import Denoiser, make_precond
from condlora.diffusion.precond import standard_normal
from condlora.lora import LoRAConfig, inject
from condlora.nets.vector import ResMLP, VectorDenoiser, VectorNetConfig
from condlora.synthesis.collection import LoRADataset
from condlora.synthesis.config import (
    EncoderConfig,
    PriorConfig,
    SynthConfig,
    VAEConfig,
    load_synth_config,
    resolve,
)
from condlora.synthesis.flatten import FlatSpec

LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the encoder's logvar, so exp() stays finite


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar)


class LoRAVAE(nn.Module):
    """Residual-MLP VAE over (B, D) vectors; calling it returns (loss, parts) for training."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        if config.dim < 1:
            raise ConfigError("VAEConfig.dim is 0: set it from the dataset (synthesis resolve)")
        self.config = config
        block = {"mlp_ratio": config.mlp_ratio, "dropout": config.dropout}
        c = config
        self.encoder = ResMLP(c.dim, c.hidden, c.depth, 2 * c.latent, **block)
        self.decoder = ResMLP(c.latent, c.hidden, c.depth, c.dim, **block)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, D) -> (mean, logvar) of q(z | x), each (B, latent)."""
        if x.dim() != 2 or x.shape[1] != self.config.dim:
            raise ConfigError(f"VAE input must be (batch, {self.config.dim}), got {tuple(x.shape)}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, latent) -> x_hat (B, D)."""
        return self.decoder(z)

    @staticmethod
    def reparametrise(
        mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """z = mean + exp(logvar / 2) * n with n ~ N(0, I) drawn from `generator`."""
        noise = standard_normal(tuple(mean.shape), generator, mean.device).to(mean.dtype)
        return mean + (0.5 * logvar).exp() * noise

    def reconstruct(self, x: Tensor) -> Tensor:
        """Deterministic reconstruction decode(mean(x)), for evaluation."""
        return self.decode(self.encode(x)[0])

    def loss(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(recon + beta * kl, {"recon", "kl"} detached) on a batch x (B, D)."""
        mean, logvar = self.encode(x)
        x_hat = self.decode(self.reparametrise(mean, logvar, generator))
        recon = (x_hat.float() - x.float()).square().mean()
        kl = gaussian_kl(mean.float(), logvar.float()).mean()
        return recon + self.config.beta * kl, {"recon": recon.detach(), "kl": kl.detach()}

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Same as `loss`; call the module (not .loss) under DDP so gradients are synced."""
        return self.loss(x, generator)


MODEL_FILE = "model.safetensors"
MODEL_FORMAT = "condlora.synth_model"
VAE_DIR, PRIOR_DIR = "vae", "prior"
BASELINE_FILE = "baseline.safetensors"
COLLECTION_FILE = "collection.safetensors"


def layout_signature(spec: FlatSpec) -> str:
    """A short hash of a layout spec: equal for collections of the same modules and shapes."""
    return hashlib.sha256(spec.to_json().encode()).hexdigest()[:16]


def floored_std(std: Tensor, fraction: float) -> Tensor:
    """std with every entry at least `fraction` of the mean std (and above 0)."""
    floor = max(fraction * float(std.double().mean()), 1e-12)
    return std.clamp(min=floor)


def embedding_dim(dataset: LoRADataset) -> int:
    """E of a dataset's embeddings, 0 if it has none."""
    return 0 if dataset.embeddings is None else int(dataset.embeddings.shape[1])


def describe_layout(spec: FlatSpec) -> str:
    """'N modules, D numbers (e.g. first.module)' for messages."""
    first = spec.modules[0] if spec.modules else "-"
    return f"{len(spec.modules)} modules, {spec.size} numbers (e.g. {first})"


@dataclass
class ModelInfo:
    """The data-facing part of a synthesis model (see the module docstring)."""

    spec: FlatSpec  # layout of the LoRA vectors
    mean: Tensor  # (D,) per-coordinate mean over the collection
    std: Tensor  # (D,) per-coordinate std, floored
    cond_dim: int  # E, width of the condition embeddings (0: none)
    method: str  # "diffusion" | "pca" | "nearest"
    encoder: EncoderConfig  # images -> embedding for `generate --images`
    source: str  # the dataset file it was made from
    count: int  # LoRAs in that dataset
    latent_mean: Tensor | None = None  # (L,) of the VAE latent means (prior on latents)
    latent_std: Tensor | None = None  # (L,) their floored std

    @property
    def signature(self) -> str:
        """The layout signature (see `layout_signature`)."""
        return layout_signature(self.spec)

    @classmethod
    def from_dataset(cls, dataset: LoRADataset, cfg: SynthConfig) -> ModelInfo:
        """Statistics and layout of a dataset, for a (resolved) config."""
        return cls(
            spec=dataset.spec,
            mean=dataset.mean.float(),
            std=floored_std(dataset.std.float(), cfg.std_floor),
            cond_dim=embedding_dim(dataset),
            method=cfg.method,
            encoder=cfg.encoder,
            source=str(dataset.path),
            count=len(dataset),
        )

    def standardise(self, x: Tensor) -> Tensor:
        """(x - mean) / std for vectors (..., D)."""
        return (x.float() - self.mean.to(x.device)) / self.std.to(x.device)

    def unstandardise(self, x: Tensor) -> Tensor:
        """The inverse of `standardise`."""
        return x.float() * self.std.to(x.device) + self.mean.to(x.device)

    def check_dataset(self, dataset: LoRADataset, folder: Path) -> None:
        """DataError if the dataset's layout is not the one this model was trained on."""
        if layout_signature(dataset.spec) != self.signature:
            raise DataError(
                f"{folder} was trained on a collection of another layout "
                f"({describe_layout(self.spec)}) than {dataset.path} "
                f"({describe_layout(dataset.spec)})"
            )

    def write(self, folder: Path) -> Path:
        """Write DIR/model.safetensors atomically."""
        tensors = {"mean": self.mean, "std": self.std}
        if self.latent_mean is not None and self.latent_std is not None:
            tensors |= {"latent_mean": self.latent_mean, "latent_std": self.latent_std}
        metadata = {
            "format": MODEL_FORMAT,
            "spec": self.spec.to_json(),
            "signature": self.signature,
            "cond_dim": str(self.cond_dim),
            "method": self.method,
            "encoder": json.dumps(dataclasses.asdict(self.encoder)),
            "source": self.source,
            "count": str(self.count),
        }
        folder.mkdir(parents=True, exist_ok=True)
        write_weights(folder / MODEL_FILE, tensors, metadata)
        return folder / MODEL_FILE

    @classmethod
    def read(cls, folder: str | Path) -> ModelInfo:
        """The ModelInfo of a model folder; DataError if it is not one."""
        folder = Path(folder)
        if not (folder / MODEL_FILE).is_file():
            raise DataError(f"{folder} is not a synthesis model folder (no {MODEL_FILE})")
        try:
            meta, t = read_weights(folder / MODEL_FILE, MODEL_FORMAT, "synthesis model", DataError)
        except SafetensorError as err:
            raise DataError(f"{folder / MODEL_FILE} is not a readable file ({err})") from None
        try:
            encoder = EncoderConfig(**json.loads(meta["encoder"]))
            info = cls(
                FlatSpec.from_json(meta["spec"]),
                t["mean"],
                t["std"],
                int(meta["cond_dim"]),
                meta["method"],
                encoder,
                meta["source"],
                int(meta["count"]),
                t.get("latent_mean"),
                t.get("latent_std"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{folder / MODEL_FILE}: malformed model file ({err})") from None
        if info.signature != meta["signature"] or info.mean.shape != (info.spec.size,):
            raise DataError(f"{folder / MODEL_FILE}: layout and statistics do not agree")
        return info


def build_prior(prior: PriorConfig) -> Denoiser:
    """The prior denoiser of a (resolved) PriorConfig: its net (UC-LoRA injected for
    cond_mode uc_lora) under its objective. The one constructor of a prior."""
    net_cfg = prior.net
    lora = uc_lora_config(net_cfg, prior.uc_bases) if net_cfg.cond_mode == "uc_lora" else None
    with torch.device("cpu"):  # the schedule's tables are real numbers, also under "meta"
        precond = make_precond(prior.objective, prior.schedule, prior.num_timesteps)
    return Denoiser(build_prior_net(net_cfg, lora), precond)


def open_dataset(path: str | Path) -> LoRADataset:
    """The dataset of a config; DataError in one line if none is given."""
    if not str(path):
        raise DataError("no dataset: give --dataset DS (or `dataset:` in the config)")
    if not Path(path).is_file():
        raise DataError(f"dataset not found: {path} (write one with `condlora synth collect`)")
    return LoRADataset(path)


UC_TARGETS = ["fc1", "fc2"]  # suffixes: the two Linear layers of every ResMLPBlock
UC_EMB_MODULE = "cond_embed"  # VectorDenoiser's condition path, output (B, cond_width)


def uc_lora_config(config: VectorNetConfig, num_bases: int = 8) -> LoRAConfig:
    """Default UC-LoRA settings for a VectorDenoiser: rank config.rank, m bases, on fc1/fc2."""
    return LoRAConfig(
        method="uc",
        rank=config.rank,
        num_bases=num_bases,
        targets=list(UC_TARGETS),
        emb_module=UC_EMB_MODULE,
    )


def build_prior_net(config: VectorNetConfig, lora: LoRAConfig | None = None) -> VectorDenoiser:
    """A VectorDenoiser for `config`; for cond_mode "uc_lora" with UC-LoRA (`lora` or default).

    The LoRA parameters are trainable like the rest; the same call rebuilds the same
    module names, so a state dict saved from one net loads into another.
    """
    if config.cond_mode != "uc_lora":
        if lora is not None and lora.method != "none":
            mode = config.cond_mode
            raise ConfigError(f"LoRA settings apply only to cond_mode 'uc_lora', not {mode!r}")
        return VectorDenoiser(config)
    lora = lora if lora is not None else uc_lora_config(config)
    if lora.method != "uc":
        raise ConfigError(f"cond_mode 'uc_lora' needs LoRA method 'uc', got {lora.method!r}")
    net = VectorDenoiser(config)
    inject(net, lora)
    return net


# parameter-name parts of the prior's condition path (ADALoRA / AdaNorm heads, UC-LoRA)
CONDITION_PARTS = ("cond_embed", "null_embedding", "modulation", "lora_", "composer")


def count(module: nn.Module, parts: tuple[str, ...] = ()) -> int:
    """Parameters of a module (only those whose name contains one of `parts`, if given)."""
    return sum(
        p.numel()
        for name, p in module.named_parameters()
        if not parts or any(part in name for part in parts)
    )


def _resolved(cfg: SynthConfig) -> SynthConfig:
    """D and E from the config, or from its dataset where it names one that exists."""
    if cfg.dataset and Path(cfg.dataset).is_file() and not (cfg.dim and cfg.cond_dim):
        dataset = open_dataset(cfg.dataset)
        return resolve(cfg, dataset.dim, embedding_dim(dataset), cfg.dataset)
    return resolve(cfg)


def info_lines(path: str | Path, overrides: list[str] | None = None) -> list[str]:
    """Lines that describe a synthesis config: sizes, the VAE's and the prior's parameters."""
    cfg = _resolved(load_synth_config(path, overrides))
    d, e = cfg.dim, cfg.cond_dim
    where = "VAE latents" if cfg.use_vae else "raw standardised vectors"
    method = f"diffusion on {where}" if cfg.method == "diffusion" else cfg.method
    lines = [
        f"config: {cfg.name} (kind synthesis, method {method})",
        f"LoRA vector D: {d:,} numbers ({4 * d / 2**20:.2f} MiB in float32)",
        f"condition embedding E: {e:,}" if e else "condition embedding E: from the dataset",
    ]
    if cfg.method == "pca":
        k = min(cfg.baseline.components, d)
        lines.append(f"pca: {k} components, parameters: {k * d + (e + 1) * k:,}")
        return lines
    if cfg.method == "nearest":
        return [*lines, "nearest: no parameters (keeps the collection)"]
    total = 0
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        if cfg.use_vae:
            vae = LoRAVAE(cfg.vae)
            total += count(vae)
            v = cfg.vae
            lines.append(
                f"VAE: latent {v.latent}, hidden {v.hidden}, depth {v.depth}, beta {v.beta}: "
                f"{count(vae):,} parameters (encoder {count(vae.encoder):,}, "
                f"decoder {count(vae.decoder):,})"
            )
        prior = build_prior(cfg.prior).net
    n = cfg.prior.net
    total += count(prior)
    lines.append(
        f"prior: {n.arch} width {n.width}, depth {n.depth}, cond_mode {n.cond_mode}, "
        f"objective {cfg.prior.objective}, on {n.dim}-d inputs: {count(prior):,} parameters "
        f"(condition path {count(prior, CONDITION_PARTS):,})"
    )
    lines.append(f"total parameters: {total:,}")
    return lines
