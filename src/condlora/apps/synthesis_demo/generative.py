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

import json
import multiprocessing
import re
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from condlora.apps.synthesis_demo.config import GenerativeConfig
from condlora.apps.synthesis_demo.methods import DemoData, Generate, Method
from condlora.nets.vector import VectorNetConfig
from condlora.synthesis.config import PriorConfig, SynthConfig, VAEConfig
from condlora.synthesis.generate import SynthModel
from condlora.synthesis.model import PRIOR_DIR, VAE_DIR
from condlora.synthesis.training import train_prior, train_vae
from condlora.train.checkpoint import CHECKPOINT_NAME, checkpoint_step
from condlora.train.config import TrainConfig
from condlora.train.loop import METRICS_FILE

COND_NAMES = {"adalora": "ADALoRA", "adanorm": "AdaNorm", "uc_lora": "UC-LoRA"}


def _train_config(
    steps: int, lr: float, batch: int, g: GenerativeConfig, seed: int, rows: int
) -> TrainConfig:
    return TrainConfig(
        batch_size=min(batch, rows),  # small training subsets: every row, every step
        lr=lr,
        warmup_steps=min(100, steps // 10),
        max_steps=steps,
        ema_decay=g.ema_decay,
        seed=seed,
        log_every=max(1, steps // 20),
        sample_every=0,
        ckpt_every=0,  # one checkpoint, at the end: its presence marks a finished stage
    )


def synth_config(
    g: GenerativeConfig, cond_mode: str, use_vae: bool, data: DemoData, seed: int
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
        dataset=str(data.dataset),
        use_vae=use_vae,
        vae=vae,
        prior=prior,
        vae_train=_train_config(g.vae_steps, g.vae_lr, g.vae_batch_size, g, seed, data.size),
        prior_train=_train_config(g.prior_steps, g.lr, g.batch_size, g, seed, data.size),
    )


@dataclass(frozen=True)
class Stage:
    """One training run of a generative method: a VAE, or a prior (on a VAE's latents)."""

    kind: str  # "vae" | "prior"
    cfg: SynthConfig
    folder: Path  # the model folder (its vae/ or prior/ run inside)
    vae_dir: Path | None = None  # prior on latents: the folder holding its VAE

    @property
    def run_dir(self) -> Path:
        """The training run's own folder (checkpoint, metrics)."""
        return self.folder / (VAE_DIR if self.kind == "vae" else PRIOR_DIR)

    @property
    def steps(self) -> int:
        """Its training steps."""
        return (self.cfg.vae_train if self.kind == "vae" else self.cfg.prior_train).max_steps

    def done(self) -> bool:
        """Whether its checkpoint is at the full step count."""
        path = self.run_dir / CHECKPOINT_NAME
        return path.is_file() and checkpoint_step(path) >= self.steps

    def run(self) -> None:
        """Train it (resuming a partial run), unless finished."""
        if self.done():
            return
        resume = (self.run_dir / CHECKPOINT_NAME).is_file()
        if self.kind == "vae":
            train_vae(self.cfg, self.folder, resume=resume, progress=False)
        else:
            train_prior(self.cfg, self.folder, self.vae_dir, resume=resume, progress=False)

    def seconds(self) -> float:
        """Training time of the finished run (its last metrics line)."""
        lines = (self.run_dir / METRICS_FILE).read_text().splitlines()
        return float(json.loads(lines[-1])["time"]) if lines else 0.0


def _run_alone(stage: Stage) -> None:
    """A worker's job: one stage on one thread (workers share the cores)."""
    torch.set_num_threads(1)
    stage.run()


def run_stages(stages: list[Stage], workers: int, progress: bool = True) -> None:
    """Train the unfinished stages, VAEs first, `workers` at a time in separate processes.

    Small networks use two cores poorly: two one-thread trainings side by side finish
    about 1.4x sooner than one after the other on two threads (docs/RESULTS.md).
    """
    unique = {s.run_dir: s for s in stages if not s.done()}
    for kind in ("vae", "prior"):
        todo = [s for s in unique.values() if s.kind == kind]
        if not todo:
            continue
        bar = tqdm(total=len(todo), desc=f"training {kind}s", disable=not progress)
        if workers <= 1:
            for stage in todo:
                stage.run()
                bar.update()
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                for future in as_completed([pool.submit(_run_alone, s) for s in todo]):
                    future.result()
                    bar.update()
        bar.close()


def _vae_stage(data: DemoData, g: GenerativeConfig, seed: int) -> Stage:
    """The VAE of a training set and seed, trained once for all latent priors."""
    cfg = synth_config(g, "adalora", True, data, seed)
    return Stage("vae", cfg, data.work_dir / f"vae-seed{seed}")


def _stages(
    name: str, cond_mode: str, use_vae: bool, g: GenerativeConfig
) -> Callable[[DemoData, int], list[Stage]]:
    """stages(data, seed): the method's VAE (when it has one) and prior, in order."""

    def stages(data: DemoData, seed: int) -> list[Stage]:
        cfg = synth_config(g, cond_mode, use_vae, data, seed)
        folder = data.work_dir / f"{method_slug(name)}-seed{seed}"
        vae = [_vae_stage(data, g, seed)] if use_vae else []
        return [*vae, Stage("prior", cfg, folder, vae[0].folder if vae else None)]

    return stages


def generative_method(
    name: str, cond_mode: str, use_vae: bool, g: GenerativeConfig, on_curve: bool
) -> Method:
    """A Method whose fit trains (or reuses) its stages and returns its seeded generator."""
    stages = _stages(name, cond_mode, use_vae, g)

    def fit(data: DemoData, seed: int) -> Generate:
        todo = stages(data, seed)
        for stage in todo:
            stage.run()
        model = SynthModel.load(todo[-1].folder)

        def generate(queries: Tensor) -> Tensor:
            return model.vectors(queries, num=1, seed=seed)[:, 0]

        return generate

    def train_seconds(data: DemoData, seed: int) -> float:
        return sum(stage.seconds() for stage in stages(data, seed))

    return Method(name, fit, on_curve, stages=stages, train_seconds=train_seconds)


def method_slug(name: str) -> str:
    """A folder name for a method: "VAE + prior (UC-LoRA)" -> "vae-prior-uc-lora"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def generative_methods(g: GenerativeConfig, raw: bool = True) -> list[Method]:
    """The VAE + latent prior with each conditioning, and (raw) diffusion on raw vectors."""
    kinds = [(f"VAE + prior ({COND_NAMES[m]})", m, True) for m in ("adalora", "adanorm", "uc_lora")]
    if raw:
        kinds.append(("raw diffusion (ADALoRA)", "adalora", False))
    # the curve against the collection's size: the paper's method only (each point refits it)
    return [
        generative_method(name, mode, vae, g, on_curve=i == 0)
        for i, (name, mode, vae) in enumerate(kinds)
    ]
