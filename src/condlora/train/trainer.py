"""The training loop on HF accelerate: one process or many (`accelerate launch`), same script.

Every random choice of step k (data order, noise levels, noise, dropout) is a
function of (seed, k, process), so a resumed run takes exactly the steps the
uninterrupted run would have taken.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from condlora.conditioning.build import build_data, build_denoiser, num_classes, resolve_data
from condlora.conditioning.config import Config
from condlora.conditioning.generate import generate, labels_for
from condlora.core.config import to_dict
from condlora.core.errors import CondloraError
from condlora.core.images import save_grid
from condlora.core.labels import class_weights
from condlora.data.augment import AugmentPipe
from condlora.diffusion import Denoiser
from condlora.train.checkpoint import CHECKPOINT_NAME, read_checkpoint, save_checkpoint
from condlora.train.ema import EMA

GRID_SAMPLES = 100
LR_SCHEDULES = ("cosine", "constant")


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


def batch_indices(k: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Indices of global batch k: epochs are seeded permutations, the last partial batch dropped."""
    per_epoch = n // batch
    if per_epoch == 0:
        raise CondloraError(f"train.batch_size {batch} is larger than the data set ({n} images)")
    epoch, within = divmod(k, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[within * batch : (within + 1) * batch]


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where this torch build supports the device."""
    try:  # CPU since torch 2.4, CUDA since 2.0 (digits on 2 CPU cores: about 5% a step)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # older torch: fused=True refuses these parameters
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _match_parameter_layout(opt: torch.optim.Optimizer) -> None:
    """Give loaded optimizer state its parameter's memory layout (channels_last included).

    The fused AdamW kernel walks a parameter and its moments as flat memory, so moments read
    back from a file in the default layout would pair the wrong elements.
    """
    for param, slots in opt.state.items():
        for name, value in slots.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                if value.stride() != param.stride():
                    slots[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _seed_step(seed: int, step: int, rank: int) -> None:
    torch.manual_seed((seed * 1_000_003 + step) * 64 + rank)


class Trainer:
    """Holds the run's state; `run()` trains to `max_steps`, checkpointing on the way."""

    def __init__(self, cfg: Config, out_dir: Path, resume: bool = False) -> None:
        cfg = resolve_data(cfg)  # once: a folder's classes are counted here, then stored
        self.cfg, self.out = cfg, Path(out_dir)
        t = cfg.train
        if t.lr_schedule not in LR_SCHEDULES:
            raise CondloraError(
                f"unknown train.lr_schedule '{t.lr_schedule}'; valid: {', '.join(LR_SCHEDULES)}"
            )
        self.acc = Accelerator(mixed_precision=t.mixed_precision)
        world = self.acc.num_processes
        if t.batch_size % world:
            raise CondloraError(
                f"train.batch_size {t.batch_size} is not divisible by {world} processes"
            )
        self._prepare_folder(resume)
        (self.train_x, self.train_y), _ = build_data(cfg)
        torch.manual_seed(t.seed)
        denoiser = build_denoiser(cfg)
        if t.channels_last:
            denoiser.to(memory_format=torch.channels_last)
        self.ema = EMA(denoiser, t.ema_decay)
        self.augment = AugmentPipe(p=t.augment_p) if t.augment_p > 0 else None
        params = [p for p in denoiser.parameters() if p.requires_grad]
        opt = adamw(params, t.lr, t.weight_decay)
        self.step = 0
        if resume:
            self._load(denoiser, opt)
        self.ema.model.to(self.acc.device)
        self.loss_fn, self.opt = self.acc.prepare(DenoisingLoss(denoiser), opt)
        if t.compile:  # here, not via Accelerator(dynamo_backend=...): that setting is
            # process-wide state and would stick to every later run in this process
            self.loss_fn = torch.compile(self.loss_fn)
        self.denoiser = denoiser

    def _prepare_folder(self, resume: bool) -> None:
        ckpt = self.out / CHECKPOINT_NAME
        if resume and not ckpt.is_file():
            raise CondloraError(f"--resume: no {CHECKPOINT_NAME} in {self.out}")
        if not resume and ckpt.is_file():
            raise CondloraError(
                f"{self.out} already holds a run: pass --resume to continue it, "
                "or --out for a new one"
            )
        if self.acc.is_main_process:
            (self.out / "samples").mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(
                yaml.safe_dump(to_dict(self.cfg), sort_keys=False)
            )

    def _load(self, denoiser: Denoiser, opt: torch.optim.Optimizer) -> None:
        saved_cfg, self.step, parts = read_checkpoint(self.out / CHECKPOINT_NAME)
        if to_dict(saved_cfg)["net"] != to_dict(self.cfg)["net"] or saved_cfg.lora != self.cfg.lora:
            raise CondloraError("--resume: the config's net or lora differs from the checkpoint's")
        denoiser.load_state_dict(parts["model"])
        self.ema.model.load_state_dict(parts["ema"])
        opt.load_state_dict(parts["optim"])
        _match_parameter_layout(opt)

    def lr_at(self, step: int) -> float:
        """Linear warm-up to the peak learning rate, then constant or cosine decay to 0."""
        t = self.cfg.train
        warm = min(1.0, (step + 1) / max(1, t.warmup_steps))
        if t.lr_schedule == "constant" or step < t.warmup_steps:
            return t.lr * warm
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return t.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches; returns (loss, grad norm)."""
        t, acc = self.cfg.train, self.acc
        _seed_step(t.seed, self.step, acc.process_index)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        total = 0.0
        for micro in range(t.grad_accum):
            k = self.step * t.grad_accum + micro
            idx = batch_indices(k, len(self.train_x), t.batch_size, t.seed)
            idx = idx[acc.process_index :: acc.num_processes]
            self.local_batch = len(idx)
            x0, y = self.train_x[idx].to(acc.device), self.train_y[idx].to(acc.device)
            if t.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            labels = self._labels(y)
            augment_labels = None
            if self.augment is not None:  # draws from the step-seeded generator
                x0, augment_labels = self.augment(x0)
            sync = nullcontext() if micro == t.grad_accum - 1 else acc.no_sync(self.loss_fn)
            with sync:
                loss = self.loss_fn(x0, labels, augment_labels) / t.grad_accum
                acc.backward(loss)
            total += loss.item()
        norm = acc.clip_grad_norm_(self.loss_fn.parameters(), t.grad_clip or math.inf)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.ema.update(self.denoiser, self.step)
        return total, float(norm)

    def _labels(self, y: torch.Tensor) -> torch.Tensor | None:
        """Training labels: None if unconditional; some rows nulled for classifier-free guidance."""
        if not self.cfg.net.class_conditional:
            return None
        p = self.cfg.train.label_dropout
        if p <= 0:
            return y
        keep = torch.rand(len(y), device=y.device) >= p  # the step-seeded generator
        return class_weights(y, num_classes(self.cfg)) * keep[:, None]

    def save(self) -> None:
        """Checkpoint (main process only; others wait)."""
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            path = self.out / CHECKPOINT_NAME
            save_checkpoint(path, self.cfg, self.step, self.denoiser, self.ema.model, self.opt)
        self.acc.wait_for_everyone()

    def sample_grid(self) -> Path | None:
        """A 10x10 grid from the EMA model (one row per class when class-conditional)."""
        if not self.acc.is_main_process:
            return None
        labels = labels_for(self.cfg, GRID_SAMPLES)
        if labels is not None:  # row r holds class r: sort the cycled labels
            labels = labels.sort().values
        images = generate(self.ema.model, self.cfg, GRID_SAMPLES, labels, seed=self.cfg.train.seed)
        return save_grid(images, self.out / "samples" / f"step_{self.step:07d}.png")

    def run(self, progress: bool = True) -> dict:
        """Train until train.max_steps; returns the last logged metrics."""
        t = self.cfg.train
        end = t.max_steps
        bar = tqdm(
            total=end, initial=self.step, disable=not (progress and self.acc.is_main_process)
        )
        log, window, start = {}, [], time.time()
        try:
            while self.step < end:
                loss, norm = self.train_step()
                window.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % t.log_every == 0 or self.step == end:
                    log = {
                        "step": self.step,
                        "loss": sum(window) / len(window),
                        "grad_norm": norm,
                        "lr": self.lr_at(self.step - 1),
                        "time": round(time.time() - start, 2),
                        "processes": self.acc.num_processes,
                        "local_batch": self.local_batch,  # per process, per micro-batch
                    }
                    self._log(log)
                    window = []
                if t.sample_every and self.step % t.sample_every == 0 and self.step != end:
                    self.sample_grid()
                if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step != end:
                    self.save()
        except KeyboardInterrupt:
            bar.write(
                f"interrupted at step {self.step}: saving a checkpoint (resume with --resume)"
            )
            self.save()
            raise
        finally:
            bar.close()
        self.save()
        self.sample_grid()
        return log

    def _log(self, record: dict) -> None:
        if self.acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


def train(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
) -> dict:
    """Train a config into `out_dir` (or continue it); max_steps replaces train.max_steps."""
    if max_steps is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=max_steps))
    return Trainer(cfg, Path(out_dir), resume=resume).run(progress=progress)
