"""The embedded default data set: scikit-learn's 8x8 handwritten digits, upsampled.

No download: `sklearn.datasets.load_digits` ships the 1,797 images with scikit-learn.
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from condlora.errors import DataError

NUM_DIGITS = 1797
NUM_CLASSES = 10


def load_digits_images(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, 1, R, R) float32 in [-1, 1] and (N,) long labels.

    Pixels 0..16 map linearly to [-1, 1]; 8x8 is upsampled to R x R bilinearly
    (align_corners=False, no antialias), which keeps values inside [-1, 1].
    """
    if (
        isinstance(resolution, bool)
        or int(resolution) != resolution
        or resolution % 8
        or resolution < 8
    ):
        raise DataError(f"digits resolution must be a positive multiple of 8, got {resolution}")
    resolution = int(resolution)
    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.float32)[:, None]  # (N, 1, 8, 8)
    images = images / 8.0 - 1.0
    if resolution != 8:
        images = F.interpolate(
            images, size=(resolution, resolution), mode="bilinear", align_corners=False
        )
    labels = torch.from_numpy(digits.target).to(torch.long)
    return images.contiguous(), labels


def split_digits(
    images: torch.Tensor,
    labels: torch.Tensor,
    holdout: int = 297,
    seed: int = 0,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Stratified random split -> ((train_x, train_y), (hold_x, hold_y)); 1500/297 by default.

    Each class gives holdout * n_class / N held-out images (largest remainders round, ties to
    the lower class), drawn with a seeded torch.Generator; both parts keep the input order.
    """
    n = len(labels)
    if len(images) != n:
        raise DataError(f"{len(images)} images but {n} labels")
    if not 0 <= holdout <= n:
        raise DataError(f"holdout must be in [0, {n}], got {holdout}")
    labels = labels.long()
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * holdout / n
    take = quota.floor().long()
    remainder = holdout - int(take.sum())
    order = sorted(range(len(classes)), key=lambda i: (-(quota[i] - take[i]).item(), i))
    for i in order[:remainder]:
        take[i] += 1

    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(n, dtype=torch.bool)
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        members = torch.nonzero(labels == c).flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[:k]]
        held[chosen] = True
    return (images[~held], labels[~held]), (images[held], labels[held])
