"""The zoo: one plain LoRA per subject, fine-tuned on its styled digits, written as peft folders.

Subjects are fine-tuned `subjects_per_batch` at a time on the frozen base model (a LoRA bank,
`condlora.synthesis.bank`, trained by `condlora.synthesis.zoo.train_bank`): every step takes
`images_per_subject` styled training digits of each subject, with their digit labels, and
the base model's own denoising loss. The loss is the sum of each subject's mean loss and
Adam is per coordinate, so a subject's training is the one it would have alone: batching
only saves time. Every subject draws its digits, noise levels and noise with a generator of
its own (`draw_seed`): independent draws, as fine-tuning each subject alone would make, so
a LoRA is not a smooth function of its style's four numbers (common random numbers made it
one, and nearest-neighbour look better than it is). Every finished batch of subjects is on
disk before the next starts, so an interrupted zoo resumes where it stopped.

    zoo/s0000/             peft folders of every subject (each seed's split picks the
                           training ones for its collection)
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
from condlora.core.errors import CondloraError
from condlora.core.files import write_text_atomic
from condlora.diffusion import Denoiser
from condlora.lora.formats import LoRAWeights, write_lora
from condlora.lora.formats.peft import WEIGHTS_NAME
from condlora.synthesis.bank import bank_denoiser, subject_lora
from condlora.synthesis.zoo import train_bank, zoo_sigma

TIMING_FILE = "timing.json"


@dataclass(frozen=True)
class Subjects:
    """The demo's subjects: names, styles, and one split into training, validation and test.

    `split_seed` redraws which subjects train and which are scored (the seeds of the table
    each draw their own split); the styles stay the subjects' own.
    """

    names: list[str]
    styles: Tensor  # (S, 4)
    train: list[int]  # the collection
    val: list[int]  # scored while choosing settings (`--split val`)
    heldout: list[int]  # the test subjects: scored once, for the report

    def folder(self, zoo_dir: Path, i: int) -> Path:
        """The peft folder of subject i."""
        return zoo_dir / self.names[i]

    def scored(self, split: str) -> list[int]:
        """The subjects a run scores: "val" or "test"."""
        return self.val if split == "val" else self.heldout


def in_corner(styles: Tensor, corner: tuple[float, float]) -> Tensor:
    """[S] whether each style is in the unseen corner (thickness and slant both above it)."""
    return (styles[:, 0] > corner[0]) & (styles[:, 1] > corner[1])


def make_subjects(cfg: DemoConfig, split_seed: int = 0) -> Subjects:
    """Subjects s0000, s0001, ... with seeded styles (the same in every setting, so settings
    share one zoo), fixed validation subjects, and the train / test split of `split_seed`.

    The validation subjects depend on cfg.seed alone, so no seed ever scores as a test
    subject one that settings were chosen on. "box": num_val random subjects validate, the
    others are shuffled into num_train training and num_heldout test subjects; "unseen-
    corner": num_val random subjects of the corner validate, the rest of the corner is the
    test, every subject outside it trains (then seeds redraw no split)."""
    names = [f"s{i:04d}" for i in range(cfg.num_subjects)]
    styles = sample_styles(cfg.num_subjects, cfg.ranges, cfg.seed)
    fixed = torch.randperm(cfg.num_subjects, generator=torch.Generator().manual_seed(cfg.seed))
    corner = in_corner(styles[fixed], cfg.corner)
    if cfg.setting == "box":
        n = cfg.num_train
        val, others = fixed[n : n + cfg.num_val], torch.cat([fixed[:n], fixed[n + cfg.num_val :]])
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + split_seed)
        others = others[torch.randperm(len(others), generator=generator)]
        train, test = others[: cfg.num_train], others[cfg.num_train :]
    else:
        train, val, test = (
            fixed[~corner],
            fixed[corner][: cfg.num_val],
            fixed[corner][cfg.num_val :],
        )
        if len(test) == 0 or len(train) < 2:
            raise CondloraError(
                f"{int(corner.sum())} of {cfg.num_subjects} subjects are in the corner "
                f"{cfg.corner}: it needs more than num_val = {cfg.num_val}, and 2 outside it"
            )
    return Subjects(names, styles, *(sorted(part.tolist()) for part in (train, val, test)))


def subject_draws(
    base: Denoiser,
    images: Tensor,
    labels: Tensor,
    styles: Tensor,
    per_subject: int,
    generators: list[torch.Generator],
    log_mean: float | None,
    log_std: float | None = None,
) -> dict[str, Tensor]:
    """One step's batch: `per_subject` digits, noise levels and noise of each subject, drawn
    with its own generator (independent draws), each in its own style."""
    k = len(styles)
    index, sigma, noise = [], [], []
    for g in generators:
        index.append(torch.randint(0, len(images), (per_subject,), generator=g))
        sigma.append(zoo_sigma(base.precond, per_subject, g, log_mean, log_std))
        noise.append(torch.randn((per_subject, *images.shape[1:]), generator=g))
    index = torch.cat(index)
    ids = torch.arange(k).repeat_interleave(per_subject)
    return {
        "x0": apply_style(images[index], styles[ids]),
        "labels": labels[index],
        "ids": ids,
        "sigma": torch.cat(sigma),
        "noise": torch.cat(noise),
    }


def fine_tune(
    base: Denoiser,
    styles: Tensor,
    images: Tensor,
    labels: Tensor,
    cfg: DemoConfig,
    seeds: list[int],
    progress: bool = False,
    zoo_seed: int = 0,
) -> list[LoRAWeights]:
    """One plain LoRA per style, fine-tuned together on the frozen base model; subject k
    draws its digits and noise with seeds[k], the LoRAs start from zoo_seed's init."""
    init_seed = cfg.seed + 1_000_003 * zoo_seed  # zoo_seed 0: cfg.seed, as it always was
    bank = bank_denoiser(base, len(styles), cfg.rank, list(cfg.targets), cfg.scale, init_seed)
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def next_batch() -> dict:
        per_subject, sigmas = cfg.images_per_subject, (cfg.log_sigma_mean, cfg.log_sigma_std)
        return subject_draws(base, images, labels, styles, per_subject, generators, *sigmas)

    train_bank(bank, cfg.steps, cfg.lr, next_batch, progress, cfg.average_last)
    return [subject_lora(bank, k) for k in range(len(styles))]


def draw_seed(cfg: DemoConfig, i: int, zoo_seed: int = 0) -> int:
    """The seed of subject i's fine-tuning draws in zoo `zoo_seed` (its own: no two
    subjects, and no two zoos, share noise; zoo 0 is the demo's first zoo)."""
    return cfg.seed * 1_000_003 + 7919 * (i + 1) + 15_485_863 * zoo_seed


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
    zoo_seed: int = 0,
) -> float:
    """Fine-tune every subject's LoRA that is not on disk yet; returns seconds per subject.

    zoo_seed: which zoo (its LoRA init and every subject's draws; 0 the demo's first).

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
        seeds = [draw_seed(cfg, i, zoo_seed) for i in members]
        styles = subs.styles[members]
        loras = fine_tune(base, styles, images, labels, cfg, seeds, progress, zoo_seed)
        for i, weights in zip(members, loras, strict=True):
            write_lora(weights, subs.folder(zoo_dir, i), "peft")
        timing[str(b)] = [time.perf_counter() - start, len(members)]
        _write_timing(zoo_dir, timing)
    seconds, count = (sum(v[i] for v in timing.values()) for i in (0, 1))
    return seconds / max(count, 1)
