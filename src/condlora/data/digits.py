"""The embedded default data set: scikit-learn's 8x8 handwritten digits, upsampled.

No download: `sklearn.datasets.load_digits` ships the 1,797 images with scikit-learn.
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from condlora.core.errors import DataError

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
