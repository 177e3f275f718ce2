"""Image diffusion as a task of the generic training loop; `train()` is `condlora train`.

The task adds what images need to the loop: the data split, EDM's augmentation, label
dropout for classifier-free guidance, channels_last, and sample grids as a callback.
Run folders: `load_run` (the EMA inference file), `saved_step`, `train_or_reuse`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from condlora.core.errors import CondloraError
from condlora.core.labels import class_weights
from condlora.core.safetensors_io import load_state_checked
from condlora.data import load_captions
from condlora.data.augment import AugmentPipe
from condlora.diffusion import Denoiser
from condlora.image.build import build_data, build_denoiser, caption_index, num_classes
from condlora.image.checks import check_model_size
from condlora.image.config import Config
from condlora.image.diffusers_net import diffusers_backbone, folder_config, is_model_folder
from condlora.image.diffusers_text import LatentCodec, fastest_device
from condlora.image.generate import save_sample_grid
from condlora.image.pretrained import init_from
from condlora.train.checkpoint import (
    CHECKPOINT_NAME,
    EMA_NAME,
    checkpoint_config,
    pretrained_keys,
    read_checkpoint,
    read_ema_model,
)
from condlora.train.loop import (
    RESUMABLE_CHANGES,
    Callback,
    Trainer,
    TrainTask,
    batch_indices,
    check_run_folder,
    config_changes,
)

IMAGE_KIND = "image-diffusion"  # the checkpoint kind of image runs


class DenoisingLoss(nn.Module):
    """The training loss as a module's forward, so DDP sees (and syncs) the call."""

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(
        self,
        x0: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar denoising loss of the objective on a clean batch."""
        cond = {"class_labels": class_labels, "augment_labels": augment_labels}
        return self.denoiser.loss(x0, **{k: v for k, v in cond.items() if v is not None})


class ImageBatches:
    """Micro-batch k of the training images: this process's share, labels, augmentation.

    Label dropout and augmentation draw from the loop's step-seeded generator.
    """

    def __init__(
        self,
        cfg: Config,
        images: torch.Tensor,
        labels: torch.Tensor,
        text: bool = False,
        vae: LatentCodec | None = None,
    ) -> None:
        self.cfg, self.images, self.labels = cfg, images, labels
        self.text = text  # labels are caption indices, passed as they are
        self.vae = vae  # images to encode per batch (latents not cached)
        p = cfg.train.augment_p
        self.augment = AugmentPipe(p=p) if p > 0 else None

    def __call__(self, k: int, acc: Accelerator) -> dict:
        """{"x0", "class_labels", "augment_labels"} of global micro-batch k on this process."""
        t = self.cfg.train
        idx = batch_indices(k, len(self.images), t.batch_size, t.seed)
        idx = idx[acc.process_index :: acc.num_processes]
        x0, y = self.images[idx].to(acc.device), self.labels[idx].to(acc.device)
        if self.vae is not None:  # a draw from the posterior (the step-seeded generator)
            x0 = self.vae.encode(x0, draw=True)
        if t.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        labels = self.class_labels(y)
        augment_labels = None
        if self.augment is not None:
            x0, augment_labels = self.augment(x0)
        return {"x0": x0, "class_labels": labels, "augment_labels": augment_labels}

    def class_labels(self, y: torch.Tensor) -> torch.Tensor | None:
        """Training labels: None if unconditional (a text model: caption indices); some rows
        nulled for classifier-free guidance (a caption: the empty prompt)."""
        if not self.cfg.net.class_conditional and not self.text:
            return None
        p = self.cfg.train.label_dropout
        if p <= 0:
            return y
        keep = torch.rand(len(y), device=y.device) >= p  # the step-seeded generator
        if self.text:  # caption indices: -1 is the empty prompt
            return torch.where(keep, y, -1)
        return class_weights(y, num_classes(self.cfg)) * keep[:, None]


class SampleGrids(Callback):
    """A class-sorted grid from the EMA model every train.sample_every steps and at the end."""

    def after_step(self, trainer: Trainer) -> None:
        """A grid on multiples of sample_every (the final step's grid comes at the end)."""
        every = trainer.train_cfg.sample_every
        if every and trainer.step % every == 0 and trainer.step != trainer.train_cfg.max_steps:
            self._grid(trainer)

    def at_end(self, trainer: Trainer) -> None:
        """The final grid."""
        self._grid(trainer)

    def _grid(self, trainer: Trainer) -> None:
        if trainer.acc.is_main_process:
            path = trainer.out / "samples" / f"step_{trainer.step:07d}.png"
            save_sample_grid(trainer.ema.model, trainer.cfg, path, seed=trainer.cfg.train.seed)


def image_task(cfg: Config, init_path: str | Path | None = None) -> TrainTask:
    """The training task of an image config (weights seeded; optionally from `init_path`)."""
    check_model_size(cfg)  # before the data is read or the model allocated
    (train_x, train_y), _ = build_data(cfg)
    torch.manual_seed(cfg.train.seed)
    denoiser = build_denoiser(cfg)
    if init_path is not None:
        init_from(denoiser, init_path, cfg)
    if cfg.train.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    net = diffusers_backbone(denoiser)
    text, vae = (None, None) if net is None else (net.text, net.vae)
    if text is not None:
        text.set_prompts(caption_index(load_captions(cfg.data.path))[0])
    if vae is not None and cfg.data.cache_latents:  # encoded once, before training
        train_x, vae = vae.encode(train_x, device=fastest_device()), None
    return TrainTask(
        model=denoiser,
        loss=DenoisingLoss(denoiser),
        batch=ImageBatches(cfg, train_x, train_y, text is not None, vae),
        config=cfg,
        kind=IMAGE_KIND,
        resumable_changes=("data.path",),  # the data may move; the split is seeded
    )


def image_trainer(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    init_path: str | Path | None = None,
    callbacks: Iterable[Callback] = (),
    grids: bool = True,
) -> Trainer:
    """A Trainer for an image config, with sample grids (unless `grids` is False) and any
    extra callbacks."""
    check_run_folder(Path(out_dir), resume, cfg)  # before the data is read or the model built
    task = image_task(cfg, None if resume else init_path)
    callbacks = [*([SampleGrids()] if grids else []), *callbacks]
    return Trainer(task, out_dir, resume=resume, callbacks=callbacks, folder_checked=True)


def train(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool | dict = True,
    init_path: str | Path | None = None,
) -> dict:
    """Train a config into `out_dir` (or continue it); max_steps replaces train.max_steps."""
    if max_steps is not None:  # the config checks the value (the command line names it first)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=max_steps))
    return image_trainer(cfg, out_dir, resume, init_path).run(progress=progress)


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
    # the stored config must not build a model larger than the weights the file holds (a
    # frozen diffusers base is read from its own folder: only the rest is in the file)
    frozen_base = cfg.net.arch == "diffusers" and not cfg.net.train_base
    if not frozen_base and check_model_size(cfg) > sum(t.numel() for t in ema.values()):
        raise CondloraError(f"{path}: its EMA weights are fewer than its config's model needs")
    denoiser = build_denoiser(cfg)
    load_state_checked(denoiser, ema, f"{path} (EMA)", skip=pretrained_keys(denoiser))
    return cfg, denoiser.to(device).eval(), step


def load_base(path: str | Path, data: str | Path) -> tuple[Config, Denoiser]:
    """(config, denoiser) of a base model: a `condlora train` run (its EMA weights), or a
    local diffusers UNet2DModel folder used as it is, with the images of `data`."""
    if not (Path(path) / EMA_NAME).exists() and is_model_folder(path):
        cfg = folder_config(path, data)
        return cfg, build_denoiser(cfg).eval()
    cfg, denoiser, _ = load_run(path)
    return cfg, denoiser


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
