"""Image data sets as tensors: the embedded digits (scikit-learn's 8x8 handwritten digits,
upsampled; no download, they ship with scikit-learn), a folder of images (flat, or one
subfolder per class), and the seeded, stratified train / held-out split of any of them."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from sklearn.datasets import load_digits

from condlora.core.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (not hidden), sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _load_image(file: Path, resolution: int, mode: str) -> np.ndarray:
    """One image: convert, center-crop to a square, bicubic-resize -> uint8 (R, R[, C])."""
    try:
        with Image.open(file) as img:
            img = img.convert(mode)
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {file}: {exc}") from None


def folder_layout(path: str | Path) -> tuple[list[Path], torch.Tensor | None, list[str]]:
    """(image files, labels or None, class names) of a flat or class-subfolder image folder."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise DataError(f"image folder {path} is a file: give a folder of images")
    if not path.is_dir():
        raise DataError(
            f"image folder not found at {path}: give a folder of images "
            "(flat, or one subfolder per class)"
        )
    top = _images_in(path)
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_files = {d.name: _images_in(d) for d in subdirs}
    empty = [name for name, files in class_files.items() if not files]
    class_files = {name: files for name, files in class_files.items() if files}
    if class_files and empty:  # a class without images would silently shrink the classes
        raise DataError(
            f"class folders without images in {path}: {', '.join(empty[:5])}"
            f"{' ...' if len(empty) > 5 else ''} ({len(class_files)} others have images): "
            "add images or remove those folders"
        )
    if top and class_files:
        raise DataError(
            f"{path} mixes images at the top level with class subfolders "
            f"({', '.join(sorted(class_files))}): put every image in a class subfolder, "
            "or use a flat folder"
        )
    if not top and not class_files:
        raise DataError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path} or its subfolders: put the "
            "images there (flat, or one subfolder per class)"
        )
    if top:
        return top, None, []
    classes = sorted(class_files)
    files = [f for name in classes for f in class_files[name]]
    index = [i for i, name in enumerate(classes) for _ in class_files[name]]
    return files, torch.tensor(index, dtype=torch.long), classes


def load_image_folder(
    path: str | Path, resolution: int, channels: int = 3
) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """Images as (N, C, R, R) float32 in [-1, 1], labels (N,) long or None, class names.

    A flat folder gives labels None and no class names; a folder of class subfolders gives
    each image the index of its subfolder among the sorted names. Images (png, jpg, jpeg,
    bmp, webp) are converted to RGB or L, center-cropped to a square, bicubic-resized.
    """
    try:
        ok = not isinstance(resolution, bool) and int(resolution) == resolution >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"image folder resolution must be a positive integer, got {resolution!r}")
    resolution = int(resolution)
    if channels not in (1, 3):
        raise DataError(f"image folder channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    mode = "L" if channels == 1 else "RGB"
    files, labels, classes = folder_layout(path)
    pixels = np.stack([_load_image(f, resolution, mode) for f in files])
    if pixels.ndim == 3:  # grayscale: (N, R, R) -> (N, R, R, 1)
        pixels = pixels[..., None]
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
    return images.contiguous(), labels, classes


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


def stratified_split(
    images: torch.Tensor,
    labels: torch.Tensor,
    holdout: int = 297,
    seed: int = 0,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Stratified random split -> ((train_x, train_y), (hold_x, hold_y)); digits: 1500/297.

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
