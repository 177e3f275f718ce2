"""Drawing digits with many subjects' LoRAs at once: one bank per group of subjects.

Subjects are sampled in groups (one batch each); within a group every sample carries its
own subject's LoRA.
Sample j of subject k asks for digit j mod 10, and its starting noise depends only on the
seed, the group and j: two methods with the same seed start from the same noise.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from condlora.apps.synthesis_demo.bank import bank_denoiser, load_subject, subjects
from condlora.diffusion import Denoiser, sample
from condlora.lora.formats import LoRAWeights

NUM_DIGITS = 10


def digit_labels(per_class: int) -> Tensor:
    """Labels of one subject's samples: 0..9, `per_class` times."""
    return torch.arange(NUM_DIGITS).repeat(per_class)


@torch.no_grad()
def sample_subjects(
    base: Denoiser,
    loras: list[LoRAWeights] | None,
    num_subjects: int,
    per_class: int,
    seed: int,
    steps: int,
    rank: int,
    group: int = 20,
    resolution: int = 16,
    progress: bool = False,
) -> Tensor:
    """(S, 10 * per_class, 1, R, R) digits in [-1, 1]: subject k with loras[k] (None: the base).

    Heun sampling (EDM) with `steps` steps; subjects in groups of `group`.
    """
    labels = digit_labels(per_class)
    n = len(labels)
    out = []
    firsts = range(0, num_subjects, group)
    for g, first in enumerate(tqdm(firsts, desc="sampling", leave=False, disable=not progress)):
        members = range(first, min(first + group, num_subjects))
        denoiser = base
        if loras is not None:
            targets = sorted(loras[first].modules)
            denoiser = bank_denoiser(base, len(members), rank, targets, scale=1.0).eval()
            for slot, k in enumerate(members):
                load_subject(denoiser, slot, loras[k])
        generator = torch.Generator().manual_seed(seed * 100_003 + g)
        ids = torch.arange(len(members)).repeat_interleave(n)
        shape = (len(ids), 1, resolution, resolution)
        y = labels.repeat(len(members))
        if loras is None:
            x = sample(denoiser, shape, "heun", steps, generator, class_labels=y)
        else:
            with subjects(denoiser, ids):
                x = sample(denoiser, shape, "heun", steps, generator, class_labels=y)
        out.append(x.clamp(-1, 1).reshape(len(members), n, 1, resolution, resolution))
    return torch.cat(out)
