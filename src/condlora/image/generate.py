"""Sampling images from a denoiser: labels, batches, and the class-sorted sample grid."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from condlora.core.errors import CondloraError, DataError
from condlora.core.files import write_text_atomic
from condlora.core.images import save_grid
from condlora.core.reporting import progress_bar
from condlora.diffusion import Denoiser, GuidedDenoiser, sample
from condlora.image.build import num_classes
from condlora.image.config import Config
from condlora.image.diffusers_net import model_shape, text_encoder, to_images
from condlora.lora.runtime import lora_layers

GRID_SAMPLES = 100  # a 10 x 10 grid
GRID_ROW = 10  # samples per row of a grid


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


def prompt_labels(
    denoiser: torch.nn.Module, num: int, prompt: str | None, label: int | None
) -> torch.Tensor | None:
    """A text model's labels for `num` samples of `prompt` (all the caption set now; None:
    the empty prompt), or None for a class model; CondloraError where the option does not
    fit the model (--prompt on a class model, --label on a text model)."""
    text = text_encoder(denoiser)
    if text is None:
        if prompt is not None:
            raise CondloraError(
                "--prompt applies to a text model (a diffusers UNet2DConditionModel); this run "
                "is not one: give --label for a class model"
            )
        return None
    if label is not None:
        raise CondloraError('this run is a text model: give --prompt "...", not --label')
    if prompt is None:
        return None
    text.set_prompts([prompt])
    return torch.zeros(num, dtype=torch.long)


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
    progress: bool | dict = False,
) -> torch.Tensor:
    """`num` images in [-1, 1] (N, C, R, R), sampled in batches with a seeded generator.

    Batches hold one class each (labels: (N,) indices or (N, K) class weights), so every
    denoiser call shares its condition and the LoRA layers apply one merged weight; the
    images come back in the order of `labels`. Starting noise: sample i gets the noise it
    got before grouping (drawn in request order, batch_size samples at a time), so the
    deterministic samplers (heun, ddim) give each sample the same image however the
    samples are grouped. Stochastic samplers (ddpm, iddpm) draw their per-step noise
    batch by batch; when the requested batches already share their class, or the
    denoiser has no LoRA layers (nothing to merge; ten small batches cost more than one
    large one), nothing is regrouped and every draw is as before.

    progress: one bar over the samples (True, or a dict of tqdm options such as desc).
    """
    device = next(denoiser.parameters()).device
    shape, decoder = model_shape(denoiser, cfg), denoiser  # a latent model's latents, decoded
    if labels is not None and cfg.diffusion.guidance != 1.0:
        null = -1 if text_encoder(denoiser) is not None else None  # a text model's "" prompt
        denoiser = GuidedDenoiser(denoiser, cfg.diffusion.guidance, num_classes(cfg), null)
    run = {
        "sampler": sampler or cfg.diffusion.sampler,
        "steps": steps or cfg.diffusion.sample_steps,
        "generator": torch.Generator(device=device).manual_seed(seed),
        "device": device,
    }
    chunks = [slice(i, min(i + batch_size, num)) for i in range(0, num, batch_size)]
    with progress_bar(progress, total=num, desc="sampling", unit="img") as bar:
        # grouping pays only where LoRA layers can merge; a plain net samples in request order
        if (
            labels is None
            or not lora_layers(denoiser)
            or all(_one_condition(labels[c]) for c in chunks)
        ):
            images = _in_request_order(denoiser, labels, chunks, shape, run, bar)
        else:
            images = _by_class(denoiser, labels, chunks, shape, run, batch_size, bar)
    images = to_images(decoder, images)
    if not torch.isfinite(images).all():  # before the clamp, which would hide an inf
        raise DataError(
            "the samples hold NaN or inf values (the weights or the sampler diverged); "
            "nothing written"
        )
    return images.clamp(-1, 1)


def _in_request_order(
    denoiser: Denoiser,
    labels: torch.Tensor | None,
    chunks: list[slice],
    shape: tuple[int, ...],
    run: dict,
    bar: tqdm,
) -> torch.Tensor:
    """The requested batches as they are."""
    out = []
    for c in chunks:
        cond = {} if labels is None else {"class_labels": labels[c].to(run["device"])}
        out.append(sample(denoiser, (c.stop - c.start, *shape), **run, **cond).cpu())
        bar.update(c.stop - c.start)
    return torch.cat(out)


def _by_class(
    denoiser: Denoiser,
    labels: torch.Tensor,
    chunks: list[slice],
    shape: tuple[int, ...],
    run: dict,
    batch_size: int,
    bar: tqdm,
) -> torch.Tensor:
    """Batches of one class each, every sample from the noise it would get in request order."""
    device, generator = run["device"], run["generator"]
    noise = torch.cat(
        [torch.randn(c.stop - c.start, *shape, generator=generator, device=device) for c in chunks]
    )
    out = torch.empty(len(labels), *shape)
    for idx in class_groups(labels, batch_size):
        cond = {"class_labels": labels[idx].to(device)}
        x = sample(denoiser, (len(idx), *shape), noise=noise[idx.to(device)], **run, **cond)
        out[idx] = x.cpu()
        bar.update(len(idx))
    return out


def _one_condition(labels: torch.Tensor) -> bool:
    """True if every row of labels is the same class (or class weights)."""
    return torch.equal(labels, labels[:1].expand_as(labels))


def class_groups(labels: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Sample indices grouped by class (equal rows of labels), in chunks of batch_size."""
    _, group = torch.unique(labels, dim=0, return_inverse=True)
    order = torch.sort(group, stable=True).indices  # by class, request order within one
    counts = torch.bincount(group).tolist()
    groups = []
    for members in order.split(counts):
        groups.extend(members.split(batch_size))
    return groups


def caption_rows(prompts: list[str], num: int) -> torch.Tensor:
    """A text model's grid labels: row r of GRID_ROW samples draws caption r (cycled over
    the first ten)."""
    return torch.arange(num) // GRID_ROW % min(len(prompts), 10)


def save_sample_grid(
    denoiser: Denoiser, cfg: Config, path: str | Path, seed: int, num: int = GRID_SAMPLES
) -> Path:
    """A grid of `num` samples, one row per class when class-conditional (labels sorted), one
    per training caption for a text model (listed in a .txt beside the grid)."""
    labels = labels_for(cfg, num)
    text = text_encoder(denoiser)
    if labels is not None:  # row r holds class r: sort the cycled labels
        labels = labels.sort().values
    elif text is not None and text.prompts:
        labels = caption_rows(text.prompts, num)
        rows = [f"row {r + 1}: {text.prompts[int(k)]}" for r, k in enumerate(labels[::GRID_ROW])]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(path).with_suffix(".txt"), "\n".join(rows) + "\n")
    return save_grid(generate(denoiser, cfg, num, labels, seed=seed), path, nrow=GRID_ROW)
