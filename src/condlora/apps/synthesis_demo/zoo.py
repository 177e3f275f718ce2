"""The zoo: one plain LoRA per subject, fine-tuned on its styled digits, written as peft folders.

Subjects are fine-tuned `subjects_per_batch` at a time on the frozen base model (a LoRA bank,
`condlora.synthesis.bank`, trained by `condlora.synthesis.zoo.train_bank`): every step takes
`images_per_subject` styled training digits of each subject,
with their digit labels, and the base model's own denoising loss. The loss is the sum of each
subject's mean loss and Adam is per coordinate, so a subject's training is the one it would
have alone: batching only saves time. Every subject sees the same digits, noise levels and
noise at every step (common random numbers, the same seed for every batch), so two LoRAs
differ by their subjects' styles, not by the luck of their draws. Every finished batch of
subjects is on disk before the next starts, so an interrupted zoo resumes where it stopped.

    zoo/train/s0000/       peft folders of the training subjects (what `collect` reads)
    zoo/heldout/s0200/     peft folders of the held-out subjects (the fine-tuned ceiling)
    zoo/timing.json        seconds per finished batch of subjects
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from condlora.apps.synthesis_demo.config import DemoConfig
from condlora.apps.synthesis_demo.styles import apply_style, sample_styles
from condlora.core.files import write_text_atomic
from condlora.diffusion import Denoiser
from condlora.lora.formats import LoRAWeights, write_lora
from condlora.lora.formats.peft import WEIGHTS_NAME
from condlora.synthesis.bank import bank_denoiser, subject_lora
from condlora.synthesis.zoo import train_bank, zoo_sigma

TIMING_FILE = "timing.json"


@dataclass(frozen=True)
class Subjects:
    """The demo's subjects: names, styles, and which are held out."""

    names: list[str]
    styles: Tensor  # (N + M, 4)
    num_train: int

    @property
    def train(self) -> range:
        """Indices of the training subjects."""
        return range(self.num_train)

    @property
    def heldout(self) -> range:
        """Indices of the held-out subjects."""
        return range(self.num_train, len(self.names))

    def folder(self, zoo_dir: Path, i: int) -> Path:
        """The peft folder of subject i."""
        split = "train" if i < self.num_train else "heldout"
        return zoo_dir / split / self.names[i]


def make_subjects(cfg: DemoConfig) -> Subjects:
    """Subjects s0000, s0001, ... with seeded styles; the last num_heldout are held out."""
    names = [f"s{i:04d}" for i in range(cfg.num_subjects)]
    return Subjects(names, sample_styles(cfg.num_subjects, cfg.ranges, cfg.seed), cfg.num_train)


def common_batch(
    base: Denoiser,
    images: Tensor,
    labels: Tensor,
    styles: Tensor,
    per_subject: int,
    generator: torch.Generator,
    log_mean: float | None,
) -> dict[str, Tensor]:
    """One step's batch: the same digits, noise levels and noise for every subject, each in
    its own style (common random numbers: LoRAs then differ by their style alone)."""
    k = len(styles)
    index = torch.randint(0, len(images), (per_subject,), generator=generator)
    sigma = zoo_sigma(base.precond, per_subject, generator, log_mean)
    noise = torch.randn((per_subject, *images.shape[1:]), generator=generator)
    ids = torch.arange(k).repeat_interleave(per_subject)
    return {
        "x0": apply_style(images[index].repeat(k, 1, 1, 1), styles[ids]),
        "labels": labels[index].repeat(k),
        "ids": ids,
        "sigma": sigma.repeat(k),
        "noise": noise.repeat(k, 1, 1, 1),
    }


def fine_tune(
    base: Denoiser,
    styles: Tensor,
    images: Tensor,
    labels: Tensor,
    cfg: DemoConfig,
    seed: int,
    progress: bool = False,
) -> list[LoRAWeights]:
    """One plain LoRA per style, fine-tuned together on the frozen base model."""
    bank = bank_denoiser(base, len(styles), cfg.rank, list(cfg.targets), cfg.scale, cfg.seed)
    generator = torch.Generator().manual_seed(seed)

    def next_batch() -> dict:
        return common_batch(
            base, images, labels, styles, cfg.images_per_subject, generator, cfg.log_sigma_mean
        )

    train_bank(bank, cfg.steps, cfg.lr, next_batch, progress)
    return [subject_lora(bank, k) for k in range(len(styles))]


def _done(folder: Path) -> bool:
    return (folder / WEIGHTS_NAME).is_file()


def _read_timing(zoo_dir: Path) -> dict[str, list[float]]:
    path = zoo_dir / TIMING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_timing(zoo_dir: Path, timing: dict[str, list[float]]) -> None:
    write_text_atomic(zoo_dir / TIMING_FILE, json.dumps(timing, indent=1, sort_keys=True))


def build_zoo(
    base: Denoiser,
    images: Tensor,
    labels: Tensor,
    cfg: DemoConfig,
    zoo_dir: str | Path,
    progress: bool = True,
    needed: set[int] | None = None,
) -> float:
    """Fine-tune every subject's LoRA that is not on disk yet; returns seconds per subject.

    needed: only the batches holding one of these subjects (default: all); a batch is
    always fine-tuned whole, so its LoRAs are the full zoo's. timing.json keeps {batch
    index: [seconds, subjects]} so a reused zoo still knows its cost.
    """
    zoo_dir = Path(zoo_dir)
    subs = make_subjects(cfg)
    size = cfg.subjects_per_batch
    timing = _read_timing(zoo_dir)
    batches = range(0, cfg.num_subjects, size)
    for b, first in enumerate(
        tqdm(batches, desc="zoo (batches of subjects)", disable=not progress)
    ):
        members = list(range(first, min(first + size, cfg.num_subjects)))
        if needed is not None and not needed & set(members):
            continue
        if all(_done(subs.folder(zoo_dir, i)) for i in members):
            continue
        start = time.perf_counter()
        loras = fine_tune(base, subs.styles[members], images, labels, cfg, cfg.seed, progress)
        for i, weights in zip(members, loras, strict=True):
            write_lora(weights, subs.folder(zoo_dir, i), "peft")
        timing[str(b)] = [time.perf_counter() - start, len(members)]
        _write_timing(zoo_dir, timing)
    seconds, count = (sum(v[i] for v in timing.values()) for i in (0, 1))
    return seconds / max(count, 1)
