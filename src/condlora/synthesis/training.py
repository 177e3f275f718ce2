"""Training a synthesis model: the VAE and the prior as tasks of the generic loop, baselines.

    train_vae(cfg, DIR)              DIR/vae/ and DIR/model.safetensors (layout, statistics)
    train_prior(cfg, DIR, vae=V)     DIR/prior/; the prior learns the standardised latent means
                                     of the collection under V's frozen VAE (encoded once), or
                                     the raw standardised vectors with use_vae: false
    train_baseline(cfg, DIR)         method "pca" / "nearest": DIR/baseline or collection file
    train_synthesis(cfg, DIR)        whatever the config's `method` (and use_vae) asks for

Batches come from the memory-mapped dataset, standardised row by row. The loop brings exact
resume, EMA, accelerate, metrics.jsonl and the progress bar; `LossPlot` draws loss.png.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator, PartialState
from matplotlib.figure import Figure
from torch import Tensor, nn

from condlora.core.config import to_dict
from condlora.core.errors import ConfigError, DataError
from condlora.core.files import read_jsonl, write_text_atomic
from condlora.core.safetensors_io import read_header
from condlora.diffusion import Denoiser
from condlora.synthesis.baselines import Nearest, collection_embeddings, fit_pca_ridge
from condlora.synthesis.collection import LoRADataset
from condlora.synthesis.config import (
    PriorRunConfig,
    SynthConfig,
    VAERunConfig,
    prior_run_config,
    resolve,
    vae_run_config,
)
from condlora.synthesis.model import (
    BASELINE_FILE,
    COLLECTION_FILE,
    MODEL_FILE,
    MODEL_FORMAT,
    PRIOR_DIR,
    VAE_DIR,
    LoRAVAE,
    ModelInfo,
    build_prior,
    embedding_dim,
    floored_std,
    open_dataset,
)
from condlora.train.checkpoint import CHECKPOINT_NAME, EMA_NAME, load_ema, read_checkpoint
from condlora.train.config import TrainConfig
from condlora.train.loop import (
    METRICS_FILE,
    Callback,
    Trainer,
    TrainTask,
    batch_indices,
    check_batch_size,
)

VAE_KIND, PRIOR_KIND = "synthesis-vae", "synthesis-prior"
RESUMABLE = ("dataset",)  # the dataset file may move between a run and its resume


class VAELoss(nn.Module):
    """recon + beta * KL of a batch, as a module's forward (so DDP syncs the call)."""

    def __init__(self, vae: LoRAVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor) -> Tensor:
        """Scalar VAE loss (the noise comes from the loop's step-seeded generator)."""
        return self.vae.loss(x)[0]


class PriorLoss(nn.Module):
    """The prior's denoising loss on a batch of standardised latents (or vectors)."""

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(
        self, x0: Tensor, embedding: Tensor | None = None, drop: Tensor | None = None
    ) -> Tensor:
        """Scalar loss of the objective; `drop` rows see the null embedding."""
        cond = {} if embedding is None else {"embedding": embedding, "drop": drop}
        return self.denoiser.loss(x0, **cond)


class RowBatches:
    """Micro-batch k: this process's share of rows, with embeddings and condition dropout."""

    def __init__(
        self,
        rows: Callable[[Tensor], Tensor],  # indices (B,) -> standardised rows (B, dim)
        count: int,  # rows in the data
        train: TrainConfig,  # batch size and seed
        key: str,  # the loss argument that the rows go to
        embeddings: Tensor | None = None,  # (count, E) conditions, or None
        dropout: float = 0.0,  # probability that a row's condition is dropped
    ) -> None:
        check_batch_size(count, train.batch_size)  # before the run writes anything
        self.rows, self.count, self.train, self.key = rows, count, train, key
        self.embeddings, self.dropout = embeddings, dropout

    def __call__(self, k: int, acc: Accelerator) -> dict:
        """The loss kwargs of global micro-batch k on this process."""
        t = self.train
        idx = batch_indices(k, self.count, t.batch_size, t.seed)
        idx = idx[acc.process_index :: acc.num_processes]
        batch = {self.key: self.rows(idx).to(acc.device)}
        if self.embeddings is not None:
            drop = torch.rand(len(idx)) < self.dropout  # the loop's step-seeded generator
            batch |= {"embedding": self.embeddings[idx].to(acc.device), "drop": drop.to(acc.device)}
        return batch


def dataset_rows(dataset: LoRADataset, info: ModelInfo) -> Callable[[Tensor], Tensor]:
    """Indices -> standardised rows read from the memory-mapped matrix."""
    return lambda idx: info.standardise(torch.from_numpy(np.array(dataset.vectors[idx.numpy()])))


def plot_losses(metrics: Path, path: Path, title: str) -> Path | None:
    """loss.png of a run's metrics.jsonl (log scale); None if nothing is logged yet."""
    records = read_jsonl(metrics)
    if not records:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], marker=".")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    return path


class LossPlot(Callback):
    """Redraw the run folder's loss.png whenever a checkpoint is written."""

    def after_save(self, trainer: Trainer) -> None:
        """Main process only."""
        if trainer.acc.is_main_process:
            title = f"{trainer.task.kind}: {trainer.cfg.name}"
            plot_losses(trainer.out / METRICS_FILE, trainer.out / "loss.png", title)


def _is_ours(path: Path) -> bool:
    """True for a part that a synthesis model folder holds (files checked by their tags)."""
    if path.name == MODEL_FILE:
        metadata, _ = read_header(path, "synthesis model", DataError)
        return metadata.get("format") == MODEL_FORMAT
    if path.name == "config.yaml":
        try:
            return yaml.safe_load(path.read_text(encoding="utf-8")).get("kind") == "synthesis"
        except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
            return False
    return path.name in (VAE_DIR, PRIOR_DIR, BASELINE_FILE, COLLECTION_FILE)


def _refuse_foreign_folder(out: Path) -> None:
    """DataError if `out` holds anything but a synthesis model's parts (before any write)."""
    foreign = sorted(p.name for p in out.iterdir() if not _is_ours(p)) if out.is_dir() else []
    if foreign:
        raise DataError(
            f"{out} holds files that are not a synthesis model's ({', '.join(foreign[:3])}): "
            "choose a new --out, or empty that folder"
        )


def _refuse_existing_model(out: Path) -> None:
    """DataError if `out` holds a trained stage (statistics alone may be rewritten)."""
    _refuse_foreign_folder(out)
    parts = (f"{VAE_DIR}/{CHECKPOINT_NAME}", f"{PRIOR_DIR}/{CHECKPOINT_NAME}")
    if any((out / p).exists() for p in (*parts, BASELINE_FILE, COLLECTION_FILE)):
        raise DataError(
            f"{out} already holds a synthesis model: pass --resume to continue it, "
            "or --out for a new one"
        )


def _write_model(info: ModelInfo, cfg: SynthConfig, out: Path) -> None:
    info.write(out)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


def train_vae(
    cfg: SynthConfig, out_dir: str | Path, resume: bool = False, progress: bool = True
) -> Path:
    """Train (or continue) the VAE of a config into DIR/vae; returns DIR."""
    out = Path(out_dir)
    if not resume:
        _refuse_existing_model(out)
    dataset = open_dataset(cfg.dataset)
    cfg = resolve(cfg, dataset.dim, embedding_dim(dataset), str(dataset.path))
    info = ModelInfo.from_dataset(dataset, cfg)
    if resume and (out / MODEL_FILE).exists():
        info = ModelInfo.read(out)
        info.check_dataset(dataset, out)
    run_cfg = vae_run_config(cfg, info.signature)
    torch.manual_seed(run_cfg.train.seed)
    vae = LoRAVAE(run_cfg.vae)
    rows = dataset_rows(dataset, info)
    batches = RowBatches(rows, len(dataset), run_cfg.train, "x")
    task = TrainTask(vae, VAELoss(vae), batches, run_cfg, VAE_KIND, resumable_changes=RESUMABLE)
    trainer = Trainer(task, out / VAE_DIR, resume=resume, callbacks=[LossPlot()])
    if trainer.acc.is_main_process:
        _write_model(info, cfg, out)
    trainer.run(progress=progress)
    return out


def load_vae(
    folder: str | Path, device: torch.device | str = "cpu"
) -> tuple[VAERunConfig, LoRAVAE]:
    """(run config, VAE with its EMA weights, eval mode) of a model folder's vae/ run."""
    run = Path(folder) / VAE_DIR
    if not any((run / name).is_file() for name in (EMA_NAME, CHECKPOINT_NAME)):
        raise DataError(f"{folder} has no trained VAE ({VAE_DIR}/{EMA_NAME})")
    run_cfg, _, vae = load_ema(run, VAERunConfig, VAE_KIND, lambda c: LoRAVAE(c.vae))
    return run_cfg, vae.to(device).requires_grad_(False)


@torch.no_grad()
def encode_collection(
    vae: LoRAVAE, dataset: LoRADataset, info: ModelInfo, rows: int = 256
) -> Tensor:
    """Latent means (N, latent) of every standardised row, in chunks."""
    device = next(vae.parameters()).device
    out = []
    for _, chunk in dataset.chunks(rows):
        x = info.standardise(torch.from_numpy(np.array(chunk)))
        out.append(vae.encode(x.to(device))[0].float().cpu())
    return torch.cat(out)


def _prior_source(
    cfg: SynthConfig, dataset: LoRADataset, vae_dir: Path
) -> tuple[SynthConfig, ModelInfo, Callable[[Tensor], Tensor]]:
    """(config with the VAE's own settings, info with latent stats, indices -> rows)."""
    if not cfg.use_vae:
        info = ModelInfo.from_dataset(dataset, cfg)
        return cfg, info, dataset_rows(dataset, info)
    info = ModelInfo.read(vae_dir)
    info.check_dataset(dataset, vae_dir)
    vae_cfg, vae = load_vae(vae_dir, PartialState().device)
    if vae_cfg.layout != info.signature:
        raise DataError(f"{vae_dir}: its VAE was trained on another layout than its model file")
    latents = encode_collection(vae, dataset, info)
    info.latent_mean = latents.mean(0)
    info.latent_std = floored_std(latents.std(0, unbiased=False), cfg.std_floor)
    standardised = (latents - info.latent_mean) / info.latent_std
    return dataclasses.replace(cfg, vae=vae_cfg.vae), info, lambda idx: standardised[idx]


def _copy_vae(vae_dir: Path, out: Path) -> None:
    """Put the VAE run next to the prior, so the model folder is complete."""
    if vae_dir.resolve() != out.resolve() and not (out / VAE_DIR).exists():
        shutil.copytree(vae_dir / VAE_DIR, out / VAE_DIR)


def train_prior(
    cfg: SynthConfig,
    out_dir: str | Path,
    vae_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Train (or continue) the prior into DIR/prior, on the latents of vae_dir's VAE (default:
    DIR's own) or on raw vectors (use_vae false); returns DIR."""
    out = Path(out_dir)
    vae_dir = Path(vae_dir) if vae_dir is not None else out
    dataset = open_dataset(cfg.dataset)
    if not resume and (vae_dir.resolve() != out.resolve() or not cfg.use_vae):
        _refuse_existing_model(out)
    elif not resume:
        _refuse_foreign_folder(out)
    conditional = cfg.prior.net.cond_mode != "none"
    embeddings = collection_embeddings(dataset) if conditional else None
    cfg, info, rows = _prior_source(cfg, dataset, vae_dir)
    cfg = resolve(cfg, dataset.dim, embedding_dim(dataset), str(dataset.path))
    info.method = "diffusion"
    run_cfg = prior_run_config(cfg, info.signature)
    torch.manual_seed(run_cfg.train.seed)
    denoiser = build_prior(run_cfg.prior)
    batches = RowBatches(
        rows, len(dataset), run_cfg.train, "x0", embeddings, run_cfg.prior.cond_dropout
    )
    task = TrainTask(
        denoiser, PriorLoss(denoiser), batches, run_cfg, PRIOR_KIND, resumable_changes=RESUMABLE
    )
    trainer = Trainer(task, out / PRIOR_DIR, resume=resume, callbacks=[LossPlot()])
    if trainer.acc.is_main_process:
        if cfg.use_vae:
            _copy_vae(vae_dir, out)
        _write_model(info, cfg, out)
    trainer.acc.wait_for_everyone()
    trainer.run(progress=progress)
    return out


def train_baseline(cfg: SynthConfig, out_dir: str | Path) -> Path:
    """Fit the config's baseline ("pca" or "nearest") into DIR; returns DIR."""
    if cfg.method not in ("pca", "nearest"):
        raise ConfigError(f"method {cfg.method!r} is not a baseline (pca, nearest)")
    out = Path(out_dir)
    _refuse_existing_model(out)
    dataset = open_dataset(cfg.dataset)
    cfg = resolve(cfg, dataset.dim, embedding_dim(dataset), str(dataset.path))
    collection_embeddings(dataset)  # both baselines need them: fail early
    info = ModelInfo.from_dataset(dataset, cfg)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.method == "pca":
        fit_pca_ridge(dataset, info.standardise, cfg.baseline).write(out / BASELINE_FILE)
    else:
        Nearest.copy_collection(dataset, out / COLLECTION_FILE)
    _write_model(info, cfg, out)
    return out


def check_resumable(out: Path) -> None:
    """Before any stage writes: every checkpoint that --resume would continue reads whole
    (a damaged one is refused in one line, with the model folder as it was)."""
    stages = ((VAE_DIR, VAERunConfig, VAE_KIND), (PRIOR_DIR, PriorRunConfig, PRIOR_KIND))
    for folder, config_class, kind in stages:
        path = out / folder / CHECKPOINT_NAME
        if path.is_file():
            read_checkpoint(path, config_class, kind)


def train_synthesis(
    cfg: SynthConfig, out_dir: str | Path, resume: bool = False, progress: bool = True
) -> Path:
    """Everything the config names: VAE then prior (or the prior alone on raw vectors), or a
    baseline; `resume` continues the stages that have a checkpoint. Returns DIR."""
    out = Path(out_dir)
    if cfg.method != "diffusion":
        return train_baseline(cfg, out)
    if resume:
        check_resumable(out)
    if cfg.use_vae:
        resume_vae = resume and (out / VAE_DIR / CHECKPOINT_NAME).is_file()
        train_vae(cfg, out, resume=resume_vae, progress=progress)
    resume_prior = resume and (out / PRIOR_DIR / CHECKPOINT_NAME).is_file()
    return train_prior(cfg, out, resume=resume_prior, progress=progress)
