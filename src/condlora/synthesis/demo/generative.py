"""The demo's generative methods: `condlora.synthesis` models trained on the zoo's collection.

    VAE + prior (ADALoRA)   the paper's method: diffusion over VAE latents, condition by ADALoRA
    VAE + prior (AdaNorm)   the same, the condition by scale-and-shift of the blocks' norms
    VAE + prior (UC-LoRA)   the same, the condition by UC-LoRA injected into the blocks' Linears
    raw diffusion (ADALoRA) no VAE: the ADALoRA prior on the raw standardised vectors

Every method trains through `train_vae` / `train_prior` (the shared training loop) into the
method's folder and generates through `SynthModel.vectors`, seeded by the run's seed. The
three latent priors of one seed and training set share one VAE (trained once, in vae-seedS/),
so they differ only by how the condition enters. Sizes: `GenerativeConfig`; a finished
stage is reused (its checkpoint at the full step count), an interrupted one resumed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from condlora.nets.vector import VectorNetConfig
from condlora.synthesis.config import PriorConfig, SynthConfig
from condlora.synthesis.demo.config import GenerativeConfig
from condlora.synthesis.demo.methods import DemoData, Generate, Method
from condlora.synthesis.generate import SynthModel
from condlora.synthesis.model import PRIOR_DIR, VAE_DIR
from condlora.synthesis.training import train_prior, train_vae
from condlora.synthesis.vae import VAEConfig
from condlora.train.checkpoint import CHECKPOINT_NAME, checkpoint_step
from condlora.train.config import TrainConfig

COND_NAMES = {"adalora": "ADALoRA", "adanorm": "AdaNorm", "uc_lora": "UC-LoRA"}


def _train_config(g: GenerativeConfig, steps: int, seed: int) -> TrainConfig:
    return TrainConfig(
        batch_size=g.batch_size,
        lr=g.lr,
        warmup_steps=min(100, steps // 10),
        max_steps=steps,
        ema_decay=g.ema_decay,
        seed=seed,
        log_every=max(1, steps // 20),
        sample_every=0,
        ckpt_every=0,  # one checkpoint, at the end: its presence marks a finished stage
    )


def synth_config(
    g: GenerativeConfig, cond_mode: str, use_vae: bool, dataset: Path, seed: int
) -> SynthConfig:
    """The SynthConfig of one generative method at the demo's sizes."""
    rank = {"adalora": g.adalora_rank, "uc_lora": g.uc_rank}.get(cond_mode, 1)
    net = VectorNetConfig(
        width=g.width,
        depth=g.depth,
        mlp_ratio=g.mlp_ratio,
        cond_mode=cond_mode,
        cond_width=g.cond_width,
        rank=rank,
    )
    prior = PriorConfig(
        net=net,
        objective=g.objective,
        cond_dropout=g.cond_dropout,
        uc_bases=g.uc_bases,
        sampler=g.sampler,
        steps=g.sample_steps,
        guidance=g.guidance,
    )
    vae = VAEConfig(latent=g.latent, hidden=g.vae_hidden, depth=g.vae_depth, beta=g.vae_beta)
    return SynthConfig(
        name=f"demo-{cond_mode}{'' if use_vae else '-raw'}",
        dataset=str(dataset),
        use_vae=use_vae,
        vae=vae,
        prior=prior,
        vae_train=_train_config(g, g.vae_steps, seed),
        prior_train=_train_config(g, g.prior_steps, seed),
    )


def _stage(folder: Path, steps: int, train: Callable[[bool], object]) -> None:
    """Run a training stage unless its checkpoint is finished; resume a partial one."""
    path = folder / CHECKPOINT_NAME
    done = checkpoint_step(path) if path.is_file() else -1
    if done < steps:
        train(done >= 0)


def _vae_dir(data: DemoData, g: GenerativeConfig, seed: int) -> Path:
    """The VAE of a training set and seed, trained once for all latent priors."""
    folder = data.work_dir / f"vae-seed{seed}"
    cfg = synth_config(g, "adalora", True, data.dataset, seed)

    def train(resume: bool) -> None:
        train_vae(cfg, folder, resume=resume, progress=False)

    _stage(folder / VAE_DIR, g.vae_steps, train)
    return folder


def generative_fit(
    name: str, cond_mode: str, use_vae: bool, g: GenerativeConfig
) -> Callable[[DemoData, int], Generate]:
    """fit(data, seed): train (or reuse) the method's model, return its seeded generator."""

    def fit(data: DemoData, seed: int) -> Generate:
        folder = data.work_dir / f"{_slug(name)}-seed{seed}"
        cfg = synth_config(g, cond_mode, use_vae, data.dataset, seed)
        vae_dir = _vae_dir(data, g, seed) if use_vae else None

        def train(resume: bool) -> None:
            train_prior(cfg, folder, vae_dir, resume=resume, progress=False)

        _stage(folder / PRIOR_DIR, g.prior_steps, train)
        model = SynthModel.load(folder)

        def generate(queries: Tensor) -> Tensor:
            return model.vectors(queries, num=1, seed=seed)[:, 0]

        return generate

    return fit


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def generative_methods(g: GenerativeConfig) -> list[Method]:
    """The VAE + latent prior with each conditioning, and diffusion on raw vectors."""
    kinds = [(f"VAE + prior ({COND_NAMES[m]})", m, True) for m in ("adalora", "adanorm", "uc_lora")]
    kinds.append(("raw diffusion (ADALoRA)", "adalora", False))
    return [Method(name, generative_fit(name, mode, vae, g)) for name, mode, vae in kinds]
