"""TrainConfig: the settings of the generic training loop, shared by every task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from condlora.core.config import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, SEED, Checked, OneOf

LR_SCHEDULES = ("cosine", "constant")
EMA_SCHEDULES = ("ramp", "fixed", "edm")
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainConfig(Checked):
    batch_size: int = 128  # global batch (split across processes)
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 200  # linear learning-rate warm-up
    lr_schedule: str = "cosine"  # after warm-up: "cosine" (decay to 0 at max_steps) | "constant"
    max_steps: int = 1100  # optimizer steps (also the horizon of the lr schedule)
    grad_clip: float = 1.0  # max gradient norm (0 disables)
    grad_accum: int = 1  # micro-batches per optimizer step
    ema_decay: float = 0.999  # EMA decay ("ramp": its ceiling; "fixed": the rate)
    ema_schedule: str = "ramp"  # "ramp": min(decay, (1+n)/(10+n)) | "fixed" | "edm" (half-life)
    ema_halflife_kimg: float = 500.0  # "edm": EMA half-life in thousands of training samples
    ema_rampup: float = 0.05  # "edm": half-life at most this fraction of the samples seen (0: off)
    nan_to_num_grads: bool = False  # replace NaN / inf gradients (NaN -> 0, +-inf -> +-1e5), as EDM
    nonfinite_limit: int = 1  # stop after this many consecutive steps with a NaN / inf loss
    mixed_precision: str = "no"  # accelerate: "no" | "fp16" | "bf16"
    compile: bool = False  # torch.compile the training loss (accelerate's inductor backend)
    seed: int = 0  # seeds init, data order and noise
    log_every: int = 50  # steps between metrics-log lines
    log_with: str | None = None  # also log to this accelerate tracker (e.g. "tensorboard")
    sample_every: int = 500  # steps between samples / previews (0: only at the end)
    ckpt_every: int = 500  # steps between checkpoints (always one at the end)

    # valid values, checked when a config is built (condlora.core.config.Checked)
    CHECKS: ClassVar[dict] = {
        "batch_size": AT_LEAST_1,
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "warmup_steps": NON_NEGATIVE,
        "lr_schedule": OneOf(LR_SCHEDULES),
        "max_steps": AT_LEAST_1,
        "grad_clip": NON_NEGATIVE,
        "grad_accum": AT_LEAST_1,
        "ema_decay": FRACTION,
        "ema_schedule": OneOf(EMA_SCHEDULES),
        "ema_halflife_kimg": POSITIVE,
        "ema_rampup": NON_NEGATIVE,
        "nonfinite_limit": AT_LEAST_1,
        "mixed_precision": OneOf(MIXED_PRECISION),
        "seed": SEED,
        "log_every": AT_LEAST_1,
        "sample_every": NON_NEGATIVE,
        "ckpt_every": NON_NEGATIVE,
    }
