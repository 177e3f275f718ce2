"""The Conditioning tab's work, without gradio: trained runs of `condlora train`, sampled.

    runs = find_runs(Path("runs"))                     # folder names, relative to runs/
    run = RunCache(Path("runs")).get(runs[0])          # config, EMA denoiser, step
    images, columns = class_grid(run, label=None, guidance=1.0, steps=18, seed=0, per_row=8)

Class weights (ClassLoRA runs): y = w_a onehot(a) + w_b onehot(b) reaches every path that
reads the class (condlora.core.labels), so w_a = 1 - t, w_b = t interpolates between two
classes and w_a > 1 extrapolates past one (the paper's figure).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from condlora.core.errors import CondloraError, DataError
from condlora.diffusion import Denoiser
from condlora.evaluation.diagnostics import (
    MIX,
    class_mix_weights,
    has_class_lora,
    sweep_grid,
    time_similarity,
    time_tables,
)
from condlora.image.build import num_classes
from condlora.image.config import Config
from condlora.image.generate import generate, labels_for
from condlora.image.task import IMAGE_KIND, load_run
from condlora.train.checkpoint import (
    CHECKPOINT_NAME,
    EMA_NAME,
    checkpoint_config,
    ema_model_config,
)

MAX_DEPTH = 3  # how deep under --runs to look for run folders
EXTRAPOLATE = (1.25, 1.5, 1.75, 2.0)  # weights of class b past 1 in the sweep


def find_runs(root: Path, depth: int = MAX_DEPTH) -> list[str]:
    """Every image-run folder under root (its checkpoint's kind checked), as relative paths."""
    found = []
    if not root.is_dir():
        return found
    folders = {p.parent for name in (EMA_NAME, CHECKPOINT_NAME) for p in root.rglob(name)}
    for folder in sorted(folders):
        rel = folder.relative_to(root)
        if len(rel.parts) > depth or any(p.startswith(".") for p in rel.parts):
            continue
        try:
            if (folder / EMA_NAME).is_file():
                ema_model_config(folder / EMA_NAME, Config, IMAGE_KIND)
            else:  # a run from before inference files
                checkpoint_config(folder / CHECKPOINT_NAME, Config, IMAGE_KIND)
        except CondloraError:  # a synthesis VAE / prior run, or a damaged file
            continue
        found.append(rel.as_posix() or ".")
    return found


@dataclass(frozen=True)
class LoadedRun:
    """A run folder's config, its EMA denoiser (eval mode) and the step it was saved at."""

    name: str
    cfg: Config
    denoiser: Denoiser
    step: int

    @property
    def classes(self) -> int:
        """Number of classes (0: unconditional)."""
        return num_classes(self.cfg)

    @property
    def class_lora(self) -> bool:
        """Whether the run has a ClassLoRA (class-weight sliders apply)."""
        return has_class_lora(self.denoiser)

    def tables(self) -> dict[str, Tensor]:
        """Its TimeLoRA tables by composer name (empty without TimeLoRA)."""
        return time_tables(self.denoiser)

    def describe(self) -> str:
        """A short Markdown summary of the run."""
        c = self.cfg
        lora = c.lora.method
        if lora != "none":
            lora += f" (rank {c.lora.rank}, on {', '.join(c.lora.targets)})"
        lines = [
            f"**{self.name}**: step {self.step}, {c.net.arch}, {c.data.name} "
            f"{c.data.resolution}x{c.data.resolution}, {self.classes or 'no'} classes",
            f"LoRA: {lora}",
            f"residual blocks: {c.net.cond_mode}; sampler {c.diffusion.sampler}",
        ]
        if self.classes and c.train.label_dropout == 0:
            lines.append(
                "trained without label dropout: guidance other than 1 has no "
                "unconditional model to guide by"
            )
        similarity = time_similarity(self.denoiser)
        if similarity:
            lines.append(
                f"TimeLoRA tables: {similarity['layers']} layers, neighbouring rows' cosine "
                f"{similarity['mean']:.3f} (at initialisation {similarity['init_mean']:.3f})"
            )
        return "  \n".join(lines)


class RunCache:
    """Runs under one root, loaded on first use and kept (the last few)."""

    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = root
        self.keep = keep
        self._runs: dict[str, LoadedRun] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> LoadedRun:
        """The run folder `name` (one of `find_runs(root)`), loaded."""
        with self._lock:
            if name not in self._runs:
                if name not in find_runs(self.root):
                    raise DataError(f"no run {name!r} under {self.root}")
                cfg, denoiser, step = load_run(self.root / name)
                while len(self._runs) >= self.keep:
                    self._runs.pop(next(iter(self._runs)))
                self._runs[name] = LoadedRun(name, cfg, denoiser, step)
            return self._runs[name]


def page_sampling_config(cfg: Config, guidance: float, steps: int) -> Config:
    """The run's config with another guidance scale and number of sampling steps."""
    if steps < 1:
        raise DataError(f"sampling steps must be at least 1, got {steps}")
    diffusion = dataclasses.replace(cfg.diffusion, guidance=guidance, sample_steps=steps)
    return dataclasses.replace(cfg, diffusion=diffusion)


def check_class(run: LoadedRun, label: int) -> int:
    """A class index of the run; DataError otherwise."""
    if not 0 <= label < run.classes:
        raise DataError(f"class {label} is not one of the run's 0..{run.classes - 1}")
    return label


def class_grid(
    run: LoadedRun,
    label: int | None,
    guidance: float,
    steps: int,
    seed: int,
    per_row: int,
) -> tuple[Tensor, int]:
    """(images, columns): one class, or one row per class (label None), `per_row` each."""
    rows = 1 if label is not None or run.classes == 0 else run.classes
    labels = labels_for(run.cfg, rows * per_row, None if label is None else check_class(run, label))
    if labels is not None and label is None:
        labels = labels.sort().values  # row r holds class r
    cfg = page_sampling_config(run.cfg, guidance, steps)
    return generate(run.denoiser, cfg, rows * per_row, labels, seed=seed), per_row


def weighted_grid(
    run: LoadedRun,
    weights: dict[int, float],
    guidance: float,
    steps: int,
    seed: int,
    count: int,
) -> Tensor:
    """`count` images sampled with float class weights {class: weight} (the others 0)."""
    if not run.classes:
        raise DataError("this run is unconditional: class weights do not apply")
    y = torch.zeros(run.classes)
    for label, weight in weights.items():
        y[check_class(run, label)] += float(weight)
    cfg = page_sampling_config(run.cfg, guidance, steps)
    return generate(run.denoiser, cfg, count, y.expand(count, -1).clone(), seed=seed)


def sweep(
    run: LoadedRun, a: int, b: int, guidance: float, steps: int, seed: int, rows: int
) -> tuple[Tensor, int]:
    """(images, columns): from class a to class b along MIX, then b weighted past 1.

    Every column starts from the same noise, so each row shows one sample's path."""
    k = run.classes
    if not k:
        raise DataError("this run is unconditional: class weights do not apply")
    a, b = check_class(run, a), check_class(run, b)
    columns = [class_mix_weights(a, b, [t], k).expand(rows, -1) for t in MIX]
    columns += [s * torch.eye(k)[b].expand(rows, -1) for s in EXTRAPOLATE]
    cfg = page_sampling_config(run.cfg, guidance, steps)
    return sweep_grid(run.denoiser, cfg, columns, seed), len(columns)
