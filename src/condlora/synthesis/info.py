"""Sizes and parameter counts of a synthesis config, without data or memory (meta tensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from condlora.synthesis.config import SynthConfig, load_synth_config, resolve
from condlora.synthesis.model import build_prior, embedding_dim, open_dataset
from condlora.synthesis.vae import LoRAVAE

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
