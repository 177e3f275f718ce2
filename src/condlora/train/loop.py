"""The generic training loop on HF accelerate: one process or many (`accelerate launch`).

A `TrainTask` says what to train: the model, a loss module around it, and a function that
returns micro-batch k. The loop owns everything else: AdamW, the learning-rate schedule,
gradient accumulation and clipping, EMA, mixed precision, checkpoints that resume exactly,
Ctrl-C / SIGTERM saves, non-finite-loss stops, `metrics.jsonl` (and an accelerate tracker),
and callbacks (sample grids, evaluation curves).

Every random choice of step k (data order, noise levels, noise, dropout) is a function of
(seed, k, process), so a resumed run takes exactly the steps the uninterrupted run would take.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn
from tqdm.auto import tqdm

from condlora.core.config import to_dict
from condlora.core.errors import CondloraError, sigterm_as_interrupt
from condlora.core.files import append_jsonl, check_output_folder, truncate_jsonl, write_text_atomic
from condlora.core.reporting import progress_bar
from condlora.train.checkpoint import (
    CHECKPOINT_NAME,
    EMA,
    EMA_NAME,
    load_training_state,
    read_checkpoint,
    save_checkpoint,
    save_ema_model,
)
from condlora.train.config import TrainConfig

METRICS_FILE = "metrics.jsonl"
# Config keys that may change when a run resumes (they do not change what it computes).
RESUMABLE_CHANGES = (
    "name",
    "train.max_steps",
    "train.log_every",
    "train.log_with",
    "train.sample_every",
    "train.ckpt_every",
    "train.compile",
    "train.nonfinite_limit",
)


class TrainingDiverged(CondloraError):
    """The loss became NaN or inf: the run stopped, its last finite checkpoint kept."""


@dataclass
class TrainTask:
    """What the loop trains; see `condlora.image.task` and `condlora.synthesis`."""

    model: nn.Module  # the trained network: optimised, averaged (EMA) and checkpointed
    loss: nn.Module  # loss(**batch) -> scalar tensor; holds `model`, so DDP syncs the call
    batch: Callable[[int, Accelerator], dict]  # micro-batch k -> this process's loss kwargs
    config: Any  # the run's config dataclass, with a `train: TrainConfig` field
    kind: str  # recorded in checkpoints: "image-diffusion", "synthesis-vae", ...
    resumable_changes: tuple[str, ...] = ()  # more dotted config keys that may differ on resume


class Callback:
    """Hooks into the loop; override what you need."""

    def on_start(self, trainer: Trainer) -> None:
        """Once before the first step (after a resume has loaded its checkpoint)."""

    def after_step(self, trainer: Trainer) -> None:
        """After every optimizer step (and its log line), before a periodic checkpoint."""

    def after_save(self, trainer: Trainer) -> None:
        """After every checkpoint write (periodic, final, or on interrupt)."""

    def at_end(self, trainer: Trainer) -> None:
        """Once after the final checkpoint of a run that reached max_steps."""


def check_batch_size(n: int, batch: int) -> None:
    """CondloraError if a batch of `batch` items does not fit in a data set of `n`."""
    if batch > n:
        raise CondloraError(f"train.batch_size {batch} is larger than the data set ({n} items)")


def batch_indices(k: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Indices of global batch k: epochs are seeded permutations, the last partial batch dropped."""
    check_batch_size(n, batch)
    per_epoch = n // batch
    epoch, within = divmod(k, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[within * batch : (within + 1) * batch]


def learning_rate(t: TrainConfig, step: int) -> float:
    """Linear warm-up from 0 at step 0 to the peak learning rate, then constant or cosine
    decay to 0. The warm-up is EDM's, lr * min(images seen / ramp-up images, 1) with the
    images seen before this step (and HF's linear warm-up): step k has lr * k / warmup."""
    warm = min(1.0, step / t.warmup_steps) if t.warmup_steps > 0 else 1.0
    if t.lr_schedule == "constant" or step < t.warmup_steps:
        return t.lr * warm
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        out.update(_flat(value, path + ".") if isinstance(value, dict) else {path: value})
    return out


def _tracker_config(cfg: Any) -> dict[str, Any]:
    """The config flattened for a tracker: numbers, strings and booleans (others as text)."""
    return {
        k: v if isinstance(v, int | float | str | bool) else str(v)
        for k, v in _flat(to_dict(cfg)).items()
    }


def config_changes(saved: Any, current: Any, allowed: Iterable[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs, except the allowed ones."""
    a, b = _flat(to_dict(saved)), _flat(to_dict(current))
    allowed = set(allowed)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in allowed)


def config_text(cfg: Any) -> str:
    """The config.yaml a run folder holds for `cfg`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def check_run_folder(out: Path, resume: bool, cfg: Any = None) -> None:
    """Refuse a run folder that cannot hold this run, before anything is built or trained.

    A new run goes only into a new or empty folder, or one where a run of this same config
    started and wrote no checkpoint yet (its config.yaml says so): never over other files."""
    out, ckpt = Path(out), Path(out) / CHECKPOINT_NAME
    if out.exists() and not out.is_dir():
        raise CondloraError(f"--out {out} is a file, not a folder")
    if ckpt.exists() and not ckpt.is_file():
        raise CondloraError(f"{ckpt} is not a file: cannot write checkpoints there")
    if resume and not ckpt.is_file():
        raise CondloraError(f"--resume: no checkpoint {CHECKPOINT_NAME} in {out}")
    if not resume and ckpt.is_file():
        raise CondloraError(
            f"{out} already holds a run: pass --resume to continue it, or --out for a new one"
        )
    check_output_folder(out, "run folder")
    if not resume and cfg is not None and out.is_dir() and any(out.iterdir()):
        saved = out / "config.yaml"
        if not saved.is_file() or saved.read_text(errors="replace") != config_text(cfg):
            raise CondloraError(
                f"{out} holds files that are not a start of this run (no checkpoint, "
                "another or no config.yaml): choose a new --out, or empty that folder"
            )


def _nonfinite_weights(module: nn.Module) -> list[str]:
    return [
        name
        for name, tensor in module.state_dict().items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]


def _fresh_accelerator_state(mixed_precision: str) -> None:
    """Let a second run in this process use another precision.

    accelerate keeps its state process-wide and refuses a second Accelerator with another
    mixed-precision mode; the distributed part (PartialState) is kept as it is.
    """
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


class Trainer:
    """Holds the run's state; `run()` trains to train.max_steps, checkpointing on the way."""

    def __init__(
        self,
        task: TrainTask,
        out_dir: str | Path,
        resume: bool = False,
        callbacks: Iterable[Callback] = (),
        folder_checked: bool = False,  # the caller ran check_run_folder with this config
    ) -> None:
        self.task, self.out, self.callbacks = task, Path(out_dir), list(callbacks)
        self.cfg, t = task.config, task.config.train
        self.train_cfg = t
        _fresh_accelerator_state(t.mixed_precision)
        self.acc = Accelerator(
            mixed_precision=t.mixed_precision,
            log_with=t.log_with,
            project_dir=str(self.out) if t.log_with else None,
        )
        if t.batch_size % self.acc.num_processes:
            raise CondloraError(
                f"train.batch_size {t.batch_size} is not divisible by "
                f"{self.acc.num_processes} processes"
            )
        if not folder_checked:
            check_run_folder(self.out, resume, self.cfg)
        model = task.model
        self.model = model
        self.ema = EMA(
            model,
            t.ema_decay,
            t.ema_schedule,
            batch_size=t.batch_size,
            halflife_kimg=t.ema_halflife_kimg,
            rampup=t.ema_rampup,
        )
        self.params = [p for p in model.parameters() if p.requires_grad]
        opt = adamw(self.params, t.lr, t.weight_decay)
        self.step, self.nonfinite = 0, 0
        if resume:
            self._load(opt)
        self._write_folder()  # only now: a failed resume leaves the run folder untouched
        self.ema.model.to(self.acc.device)
        self.loss_fn, self.opt = self.acc.prepare(task.loss, opt)
        if t.compile:  # here, not via Accelerator(dynamo_backend=...): that setting is
            # process-wide state and would stick to every later run in this process
            self.loss_fn = torch.compile(self.loss_fn)
        if t.log_with:
            self.acc.init_trackers(self.out.name, config=_tracker_config(self.cfg))

    def _load(self, opt: torch.optim.Optimizer) -> None:
        path = self.out / CHECKPOINT_NAME
        saved, self.step, parts = read_checkpoint(path, type(self.cfg), self.task.kind)
        changed = config_changes(
            saved, self.cfg, (*RESUMABLE_CHANGES, *self.task.resumable_changes)
        )
        if changed:
            raise CondloraError(
                f"--resume: the config differs from the checkpoint's in {', '.join(changed[:5])}"
                f"{' ...' if len(changed) > 5 else ''}: resume with the run's own config.yaml"
            )
        load_training_state(path, parts, self.model, self.ema.model, opt)
        _match_parameter_layout(opt)

    def _write_folder(self) -> None:
        """config.yaml, and metrics.jsonl cut back to the steps the checkpoint holds."""
        if not self.acc.is_main_process:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / "config.yaml", config_text(self.cfg), sync=True)
        # a kill after the last checkpoint logged steps that will be redone
        truncate_jsonl(self.out / METRICS_FILE, self.step)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches; returns (loss, grad norm)."""
        t, acc = self.train_cfg, self.acc
        _seed_step(t.seed, self.step, acc.process_index)
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(t, self.step)
        total = 0.0
        for micro in range(t.grad_accum):
            batch = self.task.batch(self.step * t.grad_accum + micro, acc)
            self.local_batch = len(next(iter(batch.values())))
            sync = nullcontext() if micro == t.grad_accum - 1 else acc.no_sync(self.loss_fn)
            with sync:
                loss = self.loss_fn(**batch) / t.grad_accum
                acc.backward(loss)
            total += loss.item()
        if t.nan_to_num_grads:  # EDM's loop: NaN -> 0, +-inf -> +-1e5
            for p in self.params:
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
        norm = float(acc.clip_grad_norm_(self.params, t.grad_clip or math.inf))  # no module walk
        # fp16: accelerate's gradient scaler skips overflowing steps by itself
        finite = math.isfinite(total) and (math.isfinite(norm) or t.mixed_precision == "fp16")
        if finite:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._count_nonfinite(finite, total)
        self.step += 1
        self.ema.update(self.model, self.step)
        return total, norm

    def _count_nonfinite(self, finite: bool, loss: float) -> None:
        self.nonfinite = 0 if finite else self.nonfinite + 1
        if self.nonfinite and self.nonfinite >= self.train_cfg.nonfinite_limit:
            ckpt = self.out / CHECKPOINT_NAME
            kept = f"the last checkpoint ({ckpt}) is kept" if ckpt.is_file() else "no checkpoint"
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1}: loss {loss} (or its gradient) is "
                f"not finite for {self.nonfinite} step(s); {kept}. Lower train.lr, or set "
                "train.grad_clip / train.nan_to_num_grads"
            )

    def save(self) -> None:
        """Checkpoint (main process only; others wait); never one with NaN / inf weights."""
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            bad = _nonfinite_weights(self.model) or _nonfinite_weights(self.ema.model)
            if bad:
                raise TrainingDiverged(
                    f"training diverged by step {self.step}: weights such as {bad[0]} are NaN "
                    f"or inf; not saved (the last checkpoint in {self.out} is kept)"
                )
            save_checkpoint(
                self.out / CHECKPOINT_NAME,
                self.cfg,
                self.task.kind,
                self.step,
                self.model,
                self.ema.model,
                self.opt,
            )
            path = self.out / EMA_NAME
            save_ema_model(path, self.cfg, self.task.kind, self.step, self.ema.model)
        self.acc.wait_for_everyone()
        for callback in self.callbacks:
            callback.after_save(self)

    def run(self, progress: bool | dict = True) -> dict:
        """Train until train.max_steps; returns the last logged metrics.

        progress: a bar over the steps (True, or a dict of tqdm options such as desc)."""
        t = self.train_cfg
        end = t.max_steps
        for callback in self.callbacks:
            callback.on_start(self)
        shown = progress if self.acc.is_main_process else False
        bar = progress_bar(shown, total=end, initial=self.step, unit="step")
        log, window, start = {}, [], time.time()
        try:
            with sigterm_as_interrupt():
                while self.step < end:
                    loss, norm = self.train_step()
                    window.append(loss)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    if self.step % t.log_every == 0 or self.step == end:
                        log = self._record(window, norm, start)
                        window = []
                    for callback in self.callbacks:
                        callback.after_step(self)
                    if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step != end:
                        self.save()
        except KeyboardInterrupt as stop:
            why = "terminated (SIGTERM)" if str(stop) == "SIGTERM" else "interrupted"
            tqdm.write(
                f"{why} at step {self.step}: saving a checkpoint (resume with --resume)",
                file=sys.stderr,
            )
            self.save()
            raise
        finally:
            bar.close()
        self.save()
        for callback in self.callbacks:
            callback.at_end(self)
        if t.log_with:
            self.acc.end_training()
        return log

    def _record(self, window: list[float], norm: float, start: float) -> dict:
        record = {
            "step": self.step,
            "loss": sum(window) / len(window),
            "grad_norm": norm,
            "lr": learning_rate(self.train_cfg, self.step - 1),
            "time": round(time.time() - start, 2),
            "processes": self.acc.num_processes,
            "local_batch": self.local_batch,  # per process, per micro-batch
        }
        if self.acc.is_main_process:
            append_jsonl(self.out / METRICS_FILE, record)
        if self.train_cfg.log_with:
            self.acc.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
        return record
