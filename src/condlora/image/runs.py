"""Run folders of image training: load a finished run, or train one unless it is already done."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import torch

from condlora.core.errors import CondloraError
from condlora.core.safetensors_io import load_state_checked
from condlora.diffusion import Denoiser
from condlora.image.build import build_denoiser
from condlora.image.checks import check_model_size
from condlora.image.config import Config
from condlora.image.task import IMAGE_KIND, image_trainer
from condlora.train.checkpoint import (
    CHECKPOINT_NAME,
    EMA_NAME,
    checkpoint_config,
    read_checkpoint,
    read_ema_model,
)
from condlora.train.loop import RESUMABLE_CHANGES, Callback, config_changes


def read_run_checkpoint(path: str | Path) -> tuple[Config, int, dict[str, dict]]:
    """(config, step, parts) of an image run's training checkpoint (what --resume reads)."""
    return read_checkpoint(Path(path), Config, IMAGE_KIND)


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[Config, Denoiser, int]:
    """(config, denoiser with the EMA weights, step) of a training run folder."""
    run_dir = Path(run_dir)
    path = run_dir / EMA_NAME
    if not run_dir.exists():
        raise CondloraError(f"run folder not found: {run_dir}")
    if not run_dir.is_dir():
        raise CondloraError(
            f"{run_dir} is a file, not a run folder (give the folder --out of train)"
        )
    if not path.exists() and not (run_dir / CHECKPOINT_NAME).exists():
        raise CondloraError(
            f"no {EMA_NAME} (nor {CHECKPOINT_NAME}) in {run_dir}: is it a `condlora train` folder?"
        )
    cfg, step, ema = read_ema_model(path, Config, IMAGE_KIND)
    # the stored config must not build a model larger than the weights the file holds
    if check_model_size(cfg) > sum(t.numel() for t in ema.values()):
        raise CondloraError(f"{path}: its EMA weights are fewer than its config's model needs")
    denoiser = build_denoiser(cfg)
    load_state_checked(denoiser, ema, f"{path} (EMA)")
    return cfg, denoiser.to(device).eval(), step


def saved_step(run_dir: Path, cfg: Config) -> int:
    """Step of the run's checkpoint (0: none); an error if the folder holds another config.

    Only what does not change the computation (log and checkpoint intervals, ...) may differ;
    train.max_steps counts, since it sets the learning-rate horizon.
    """
    ckpt = run_dir / CHECKPOINT_NAME
    if not ckpt.is_file():
        return 0
    saved, step = checkpoint_config(ckpt, Config, IMAGE_KIND)
    allowed = [k for k in RESUMABLE_CHANGES if k not in ("train.max_steps", "train.ckpt_every")]
    changed = config_changes(saved, cfg, [*allowed, "data.path"])
    if changed:
        raise CondloraError(
            f"{run_dir} holds a run of a different config ({', '.join(changed[:4])} changed): "
            "delete it or pass another --out"
        )
    return step


def train_or_reuse(
    cfg: Config,
    run_dir: str | Path,
    progress: bool | dict = True,
    callbacks: Iterable[Callback] = (),
    grids: bool = True,
) -> float:
    """Train `cfg` in `run_dir` to train.max_steps, resuming a partial run of the same config.

    A finished run of the same config is reused. Returns the seconds spent training now.
    grids: sample grids in the run folder during and after training.
    """
    run_dir = Path(run_dir)
    done = saved_step(run_dir, cfg)
    if done >= cfg.train.max_steps:
        return 0.0
    start = time.time()
    image_trainer(cfg, run_dir, resume=done > 0, callbacks=callbacks, grids=grids).run(progress)
    return time.time() - start
