"""Learned strength schedules for a static LoRA on an image run (`condlora schedule fit`).

The base model and the LoRA stay as they are; only the schedule's table s(t, block)
(`condlora.lora.schedule`, started at 1) is trained, with DreamBooth's trade-off between
learning the LoRA's images and preserving the base model, the prior here being the base
model's own predictions on the same noised images, both in the backbone's output units
(the objective's own weighting: EDM's lambda(sigma) = 1 / c_out^2 is absorbed):

    L = loss of the scheduled model on the LoRA's images (the run's objective)
      + weight * mean || F_s(c_in x, c_noise) - F_base(c_in x, c_noise) ||^2,
        x = x0 + sigma n, F the backbone

The base prediction reuses the loss's own backbone inputs (one forward with the LoRA and
one without per step). Noise levels are drawn from the sampler's grid (where the schedule
acts), or from the run's training distribution. A large weight keeps the base model where
the LoRA would change it most; weight 0 leaves the LoRA at whatever strength fits its
images best.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor

from condlora.core.errors import CondloraError
from condlora.core.files import check_output_folder, write_text_atomic
from condlora.core.reporting import progress_bar
from condlora.core.safetensors_io import read_weights, write_weights
from condlora.data import load_image_folder
from condlora.diffusion import Denoiser
from condlora.image.build import ConditionedNet
from condlora.image.diffusers_net import backbone_modules, check_pixel_model
from condlora.image.task import load_base
from condlora.lora.formats import LoRAWeights, base_modules_of, read_lora
from condlora.lora.schedule import (
    ONE_BLOCK,
    StrengthSchedule,
    apply_schedule,
    base_only,
    follow_noise_level,
)

SCHEDULE_FILE = "schedule.safetensors"
SCHEDULE_FORMAT = "condlora-schedule-1"


@dataclass(frozen=True)
class FitSettings:
    """How a schedule is fitted."""

    steps: int = 100  # Adam steps on the table
    lr: float = 0.1  # Adam learning rate
    batch: int = 32  # images per step
    weight: float = 1.0  # weight of the preservation term
    seed: int = 0  # batches and noise
    sampler_steps: int | None = None  # draw sigma from this sampler grid (None: training's)


def attach_schedule(
    denoiser: Denoiser, lora: LoRAWeights, bins: int = 8, per_block: bool = False
) -> StrengthSchedule:
    """Wrap the LoRA's modules of an image denoiser's backbone with a schedule that follows
    the noise level of every call (training and sampling alike); returns the schedule."""
    if not isinstance(denoiser.net, ConditionedNet):
        raise CondloraError("a schedule needs an image run's denoiser (`condlora train`)")
    deltas = {name: module.delta() for name, module in lora.modules.items()}
    schedule = apply_schedule(backbone_modules(denoiser)[0], deltas, bins, per_block)
    follow_noise_level(denoiser.net, schedule, denoiser.precond.time_of_label)
    return schedule


def fit_schedule(
    denoiser: Denoiser,
    schedule: StrengthSchedule,
    images: Tensor,
    labels: Tensor | None,
    settings: FitSettings = FitSettings(),  # noqa: B008 - frozen, so a shared default is safe
    progress: bool = False,
) -> list[dict]:
    """Train the schedule's table on (images, labels); returns the loss log per step."""
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.Adam(schedule.parameters(), lr=settings.lr)
    denoiser.eval()
    log = []
    with progress_bar(progress, total=settings.steps, desc="schedule") as bar:
        for step in range(settings.steps):
            log.append(_fit_step(denoiser, schedule, opt, images, labels, settings, gen))
            log[-1]["step"] = step + 1
            bar.update()
    return log


def fit_sigmas(denoiser: Denoiser, settings: FitSettings, gen: torch.Generator) -> Tensor:
    """A batch of noise levels: uniform over the sampler grid's steps, or the training ones."""
    if settings.sampler_steps is None:
        return denoiser.precond.sample_sigma(settings.batch, gen)
    grid = denoiser.precond.sampling_sigmas(settings.sampler_steps)[:-1]
    return grid[torch.randint(len(grid), (settings.batch,), generator=gen)]


def _fit_step(
    denoiser: Denoiser,
    schedule: StrengthSchedule,
    opt: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor | None,
    settings: FitSettings,
    gen: torch.Generator,
) -> dict:
    """One Adam step of the table on a batch: the fit and preservation terms."""
    idx = torch.randint(len(images), (settings.batch,), generator=gen)
    x0 = images[idx]
    cond = {} if labels is None else {"class_labels": labels[idx]}
    sigma = fit_sigmas(denoiser, settings, gen)
    noise = torch.randn(x0.shape, generator=gen)
    calls = []  # the backbone call of the loss: its inputs and output (F_s)
    hook = denoiser.net.register_forward_hook(
        lambda _m, args, kwargs, out: calls.append((args, kwargs, out)), with_kwargs=True
    )
    try:
        fit = denoiser.loss(x0, sigma=sigma, noise=noise, **cond)
    finally:
        hook.remove()
    (args, kwargs, scheduled_out), *_ = calls
    with torch.no_grad(), base_only(schedule):
        prior = denoiser.net(*args, **kwargs)
    keep = (scheduled_out.float() - prior.float()).square().mean()
    loss = fit + settings.weight * keep
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"fit": float(fit.detach()), "preserve": float(keep.detach())}


def fit_from_files(
    run: Path,
    lora_path: Path,
    data: Path,
    out: Path,
    bins: int,
    per_block: bool,
    settings: FitSettings,
    progress: bool = True,
) -> StrengthSchedule:
    """`condlora schedule fit`: read the run, the LoRA and the images, fit, write into out."""
    check_output_folder(out, "--out")
    cfg, denoiser = load_base(run, data)
    check_pixel_model(denoiser, "schedule fit")
    lora = read_lora(lora_path, base_modules_of(backbone_modules(denoiser)[0]))
    images, labels, names = load_image_folder(data, cfg.data.resolution, cfg.data.channels)
    if cfg.net.class_conditional and labels is None:
        raise CondloraError(
            f"{run} is class-conditional: give the images in class subfolders of {data}"
        )
    if labels is not None and len(names) > cfg.data.num_classes:
        raise CondloraError(
            f"{data} has {len(names)} class subfolders, the model {cfg.data.num_classes} classes"
        )
    schedule = attach_schedule(denoiser, lora, bins, per_block)
    if settings.sampler_steps is None:  # fit where the run's sampler will use it
        settings = replace(settings, sampler_steps=cfg.diffusion.sample_steps)
    fit_schedule(denoiser, schedule, images, labels, settings, progress)
    meta = {"run": str(run), "lora": str(lora_path), "weight": str(settings.weight)}
    write_schedule(schedule, out, sampler_times(denoiser, cfg.diffusion.sample_steps), meta)
    return schedule


def sampler_times(denoiser: Denoiser, steps: int) -> list[float]:
    """Normalised noise levels t of a sampler's `steps` steps (what exports are given at)."""
    sigmas = denoiser.precond.sampling_sigmas(steps)[:-1]
    return denoiser.precond.time_of_label(denoiser.precond.noise_label(sigmas)).tolist()


def plot_schedule(schedule: StrengthSchedule, path: Path) -> Path:
    """s(t, block) against the noise level, one line per block."""
    ts = torch.linspace(0, 1, 101)
    with torch.no_grad():
        values = schedule.strength(ts)
    fig = Figure(figsize=(5.5, 3.6), dpi=110)
    ax = fig.subplots()
    for b, block in enumerate(schedule.blocks):
        ax.plot(ts.numpy(), values[:, b].numpy(), label=block)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="static LoRA (1)")
    ax.set_xlabel("noise level t (0 clean, 1 noisiest)")
    ax.set_ylabel("LoRA strength s(t)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_schedule(schedule: StrengthSchedule, out: Path, ts: list[float], meta: dict) -> None:
    """schedule.safetensors (table and blocks), .csv, keyframes.json and a diffusers
    callback (diffusers_callback.py) at the sampler's noise levels, and schedule.png."""
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": SCHEDULE_FORMAT, "blocks": json.dumps(schedule.blocks)}
    write_weights(out / SCHEDULE_FILE, {"table": schedule.table.detach()}, {**metadata, **meta})
    write_text_atomic(out / "schedule.csv", schedule.to_csv(ts))
    write_text_atomic(out / "keyframes.json", schedule.keyframes(ts))
    write_text_atomic(out / "diffusers_callback.py", schedule.diffusers_callback(ts))
    plot_schedule(schedule, out / "schedule.png")


def lora_with_schedule(
    denoiser: Denoiser, lora_path: Path, schedule_path: Path | None = None, strength: float = 1.0
) -> StrengthSchedule:
    """`condlora sample --lora FILE [--schedule DIR | --strength S]`: the run's denoiser with
    a static LoRA applied at a fitted schedule (or at a constant strength)."""
    lora = read_lora(lora_path, base_modules_of(backbone_modules(denoiser)[0]))
    if schedule_path is None:
        schedule = attach_schedule(denoiser, lora, bins=1)
        with torch.no_grad():
            schedule.table.fill_(strength)
        return schedule
    path = Path(schedule_path)
    path = path / SCHEDULE_FILE if path.is_dir() else path
    meta, tensors = read_weights(path, SCHEDULE_FORMAT, "condlora schedule", CondloraError)
    blocks, table = json.loads(meta.get("blocks", "[]")), tensors.get("table")
    if table is None or table.dim() != 2:
        raise CondloraError(f"{path}: no schedule table in it")
    schedule = attach_schedule(denoiser, lora, table.shape[1], per_block=blocks != [ONE_BLOCK])
    read_schedule_into(schedule, path)
    return schedule


def read_schedule_into(schedule: StrengthSchedule, path: Path) -> None:
    """Load a written schedule's table into `schedule` (same blocks and bins, checked)."""
    meta, tensors = read_weights(path, SCHEDULE_FORMAT, "condlora schedule", CondloraError)
    table = tensors.get("table")
    blocks = json.loads(meta.get("blocks", "[]"))
    if table is None or blocks != schedule.blocks or table.shape != schedule.table.shape:
        raise CondloraError(
            f"{path}: its schedule ({blocks}, {None if table is None else tuple(table.shape)}) "
            f"does not fit this LoRA's ({schedule.blocks}, {tuple(schedule.table.shape)})"
        )
    with torch.no_grad():
        schedule.table.copy_(table)
