"""The demo's settings: sizes of the zoo, fine-tuning, encoder and scoring, with two presets.

`DemoConfig()` is the full demo (200 training and 40 held-out subjects); `quick()` a smaller
one for a first look; `tiny()` one that the test suite (and a screenshot without a real demo)
builds in seconds.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import ClassVar

from condlora.apps.synthesis_demo.styles import StyleRanges
from condlora.core.config import FRACTION, NON_NEGATIVE, POSITIVE, Checked, Each, OneOf, Range

# What the LoRAs adapt (DESIGN.md section 4): attention qkv / proj, the residual blocks'
# 1x1 skip convolutions and their embedding projections: 20,864 numbers per rank-4 LoRA
# on the digits baseline, enough to carry a handwriting style. Adding the blocks' first
# 3x3 convs ("conv1": LoCon) gains about 3 points of class accuracy at the same steps for
# 1.29x the zoo's time and 55,552 numbers; with 600 steps 91.4% (docs/RESULTS.md,
# validation subjects), too long for the 30-minute demo.
TARGETS = ("qkv", "proj", "skip", "emb_proj")


@dataclass(frozen=True)
class GenerativeConfig(Checked):
    """Sizes of the generative methods (`generative.py`): small VAE and priors, equal terms."""

    latent: int = 64  # VAE latent width
    vae_hidden: int = 128  # VAE residual width (encoder and decoder)
    vae_depth: int = 2  # VAE residual blocks (each side)
    vae_beta: float = 0.01  # weight of the KL term
    vae_steps: int = 1000  # VAE training steps
    vae_lr: float = 1e-2  # VAE learning rate (AdamW, warm-up then cosine decay)
    vae_batch_size: int = 64  # VAE batch
    width: int = 256  # prior residual width (every conditioning, latent and raw alike)
    depth: int = 4  # prior residual blocks
    mlp_ratio: float = 2.0  # hidden width of each block's MLP / width
    cond_width: int = 128  # width of the condition embedding that every block reads
    adalora_rank: int = 1  # ADALoRA rank r (1: as many parameters as AdaNorm's heads)
    uc_rank: int = 2  # UC-LoRA rank of each basis
    uc_bases: int = 4  # UC-LoRA bases m per adapted layer
    objective: str = "v"  # prior objective: "v" | "x0"
    cond_dropout: float = 0.1  # rows trained with the null condition (classifier-free guidance)
    guidance: float = 1.0  # classifier-free guidance scale at sampling
    sampler: str = "ddim"  # prior sampler
    sample_steps: int = 50  # prior sampling steps
    prior_steps: int = 1200  # prior training steps
    batch_size: int = 64  # prior batch
    lr: float = 1e-3  # prior learning rate (AdamW, warm-up then cosine decay)
    ema_decay: float = 0.995  # both stages

    CHECKS: ClassVar[dict] = {
        **{name: Range(1, 2**20) for name in ("latent", "vae_hidden", "vae_depth", "width")},
        **{name: Range(1, 2**20) for name in ("depth", "cond_width", "adalora_rank", "uc_rank")},
        **{name: Range(1, 10**7) for name in ("uc_bases", "vae_steps", "prior_steps")},
        **{name: Range(1, 10**7) for name in ("vae_batch_size", "batch_size", "sample_steps")},
        **{name: POSITIVE for name in ("vae_lr", "lr", "mlp_ratio")},
        "vae_beta": NON_NEGATIVE,
        "cond_dropout": Range(0, 1, high_open=True),
        "guidance": NON_NEGATIVE,
        "ema_decay": FRACTION,
    }


@dataclass(frozen=True)
class DemoConfig(Checked):
    """Every knob of `condlora synth demo`; stored in the output folder to guard its reuse."""

    seed: int = 0  # subjects' styles, LoRA init, fine-tuning, encoder, reference images
    num_train: int = 200  # training subjects (the collection)
    num_val: int = 20  # validation subjects: scored while choosing settings (`split="val"`)
    num_heldout: int = 40  # held-out test subjects: scored once, for the report
    split: str = "test"  # the subjects a run scores: "test" (the report) or "val" (tuning)
    # "box": training, validation and test subjects drawn from the same box; "unseen-corner":
    # the subjects in the corner (thickness > corner[0] and slant > corner[1], bold and
    # right-leaning: a quarter of the box) are split into num_val validation and test
    # subjects, every other subject trains (num_train is not used): combinations of two
    # factors that no training subject shows. The styles, so the zoo, are the same in both.
    setting: str = "box"
    corner: tuple[float, float] = (0.0, 0.0)  # the unseen corner's lower thickness and slant
    raw_diffusion: bool = True  # also score the prior on raw vectors (costs most training)
    ranges: StyleRanges = field(default_factory=StyleRanges)  # where style factors are drawn
    # zoo: one plain LoRA per subject on the frozen base model
    rank: int = 4  # LoRA rank
    alpha: float = 4.0  # peft lora_alpha (scale alpha / rank)
    targets: tuple[str, ...] = TARGETS  # target module names (suffixes)
    # each seed of the table fine-tunes its own zoo (its own LoRA init and draws of digits
    # and noise) instead of sharing the first seed's: the zoo's cost times the seeds
    redraw_zoo: bool = False
    subjects_per_batch: int = 40  # subjects fine-tuned together (per-sample LoRA in one batch)
    images_per_subject: int = 4  # styled digits of each subject in every step
    # fine-tuning steps per subject: 300, chosen on 8 validation subjects by
    # benchmarks/synth_demo_zoo.py (docs/RESULTS.md): 150 steps left a LoRA's digits
    # illegible one time in four, 300 kept them legible more often and the style stronger
    steps: int = 300
    lr: float = 5e-3  # Adam learning rate (linear decay to 0 over the last half)
    average_last: float = 0.0  # > 0: each LoRA is the mean of its iterates over this
    # fraction of the last steps (Polyak averaging; 0: the last iterate)
    log_sigma_mean: float | None = 0.0  # EDM base: mean of ln(sigma) while fine-tuning (None:
    # the base's own P_mean); noisier levels than the base's -0.8 keep the digits legible
    log_sigma_std: float | None = None  # its std (None: the base's P_std, 1.2)
    judge_steps: int = 600  # training steps of the digits judge (plain and styled digits)
    # subject encoder (stand-in for ArcFace)
    encoder_steps: int = 800  # training steps (batch 64, fresh random styles)
    encoder_dim: int = 64  # embedding width
    reference_images: int = 20  # images a subject's embedding is computed from
    # scoring
    samples_per_class: int = 1  # samples per digit per held-out subject (x 10 digits)
    sample_steps: int = 12  # Heun steps (23 evaluations; 18 steps: the same scores, 1.5x time)
    score_seeds: tuple[int, ...] = (0, 1, 2)  # seeds of the methods and the sampling
    curve_sizes: tuple[int, ...] = (25, 100)  # training subsets for the curve (and all)
    grid_subjects: int = 4  # held-out subjects shown in grids
    generative: GenerativeConfig = field(default_factory=GenerativeConfig)  # VAE and priors

    CHECKS: ClassVar[dict] = {
        "seed": Range(0, 2**63 - 1),
        "num_train": Range(2, 10**6),
        "num_val": Range(0, 10**6),
        "split": OneOf(("test", "val")),
        "setting": OneOf(("box", "unseen-corner")),
        **{name: Range(1, 10**6) for name in ("num_heldout", "rank", "subjects_per_batch")},
        **{name: Range(1, 10**7) for name in ("steps", "images_per_subject", "reference_images")},
        "alpha": POSITIVE,
        "lr": POSITIVE,
        "average_last": FRACTION,
        "log_sigma_std": POSITIVE,
        "targets": Each(),
        "score_seeds": Each(Range(0, 2**63 - 1)),
        "curve_sizes": Each(Range(2, 10**6), allow_empty=True),
        "samples_per_class": Range(1, 10**4),
        "sample_steps": Range(1, 10**4),
    }

    @property
    def num_subjects(self) -> int:
        """Training, validation and test subjects."""
        return self.num_train + self.num_val + self.num_heldout

    @property
    def scale(self) -> float:
        """LoRA scale alpha / rank."""
        return self.alpha / self.rank

    def sizes(self) -> list[int]:
        """Training-set sizes of the curve: the configured ones below num_train, then all."""
        return sorted({n for n in self.curve_sizes if 2 <= n < self.num_train} | {self.num_train})

    def to_json(self) -> str:
        """The config as sorted JSON (what reuse compares)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def quick() -> DemoConfig:
    """A smaller demo for a first look: 60 training, 8 validation and 12 test subjects, half the
    generative training steps."""
    return DemoConfig(
        num_train=60,
        num_val=8,
        num_heldout=12,
        steps=200,
        encoder_steps=500,
        generative=GenerativeConfig(vae_steps=500, prior_steps=600),
    )


def unseen_corner(cfg: DemoConfig) -> DemoConfig:
    """The unseen-corner setting of a demo config: the latent priors and the simple methods,
    no curve and no raw diffusion (the time goes to the three seeds of every method)."""
    return dataclasses.replace(cfg, setting="unseen-corner", curve_sizes=(), raw_diffusion=False)


def tiny() -> DemoConfig:
    """A demo of 6 training, 2 validation and 2 test subjects that runs in seconds (for tests)."""
    return DemoConfig(
        num_train=6,
        num_val=2,
        num_heldout=2,
        subjects_per_batch=4,
        steps=30,
        lr=2e-2,
        encoder_steps=40,
        judge_steps=20,
        reference_images=6,
        sample_steps=4,
        curve_sizes=(3,),
        grid_subjects=1,
        generative=GenerativeConfig(
            latent=4,
            vae_hidden=16,
            vae_depth=1,
            vae_steps=8,
            width=16,
            depth=1,
            cond_width=8,
            uc_bases=2,
            sample_steps=3,
            prior_steps=8,
            batch_size=4,
        ),
    )
