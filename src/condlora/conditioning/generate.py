"""Sampling images from a denoiser: labels, batches, and the class-sorted sample grid."""

from __future__ import annotations

from pathlib import Path

import torch

from condlora.conditioning.build import image_channels, num_classes
from condlora.conditioning.config import Config
from condlora.core.errors import CondloraError
from condlora.core.images import save_grid
from condlora.diffusion import Denoiser, GuidedDenoiser, sample

GRID_SAMPLES = 100  # a 10 x 10 grid


def labels_for(cfg: Config, num: int, label: int | None = None) -> torch.Tensor | None:
    """Class labels for `num` samples: all `label`, or 0..K-1 cycled (None if unconditional)."""
    classes = num_classes(cfg)
    if classes == 0:
        if label is not None:
            raise CondloraError("this model is unconditional: --label does not apply")
        return None
    if label is not None:
        if not 0 <= label < classes:
            raise CondloraError(f"--label must be in 0..{classes - 1}, got {label}")
        return torch.full((num,), label, dtype=torch.long)
    return torch.arange(num) % classes


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    cfg: Config,
    num: int,
    labels: torch.Tensor | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    seed: int = 0,
    batch_size: int = 500,
    progress: bool = False,
) -> torch.Tensor:
    """`num` images in [-1, 1] (N, 1, R, R), sampled in batches with a seeded generator."""
    device = next(denoiser.parameters()).device
    if labels is not None and cfg.diffusion.guidance != 1.0:
        denoiser = GuidedDenoiser(denoiser, cfg.diffusion.guidance, num_classes(cfg))
    generator = torch.Generator(device=device).manual_seed(seed)
    res = cfg.data.resolution
    out = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        cond = {} if labels is None else {"class_labels": labels[start : start + n].to(device)}
        x = sample(
            denoiser,
            (n, image_channels(cfg), res, res),
            sampler=sampler or cfg.diffusion.sampler,
            steps=steps or cfg.diffusion.sample_steps,
            generator=generator,
            device=device,
            progress=progress,
            **cond,
        )
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


def save_sample_grid(
    denoiser: Denoiser, cfg: Config, path: str | Path, seed: int, num: int = GRID_SAMPLES
) -> Path:
    """A grid of `num` samples, one row per class when class-conditional (labels sorted)."""
    labels = labels_for(cfg, num)
    if labels is not None:  # row r holds class r: sort the cycled labels
        labels = labels.sort().values
    return save_grid(generate(denoiser, cfg, num, labels, seed=seed), path)
