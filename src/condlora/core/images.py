"""Image grids as PNG files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from condlora.core.files import check_output_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def check_image_path(path: str | Path, what: str = "--out") -> Path:
    """An image file path that can be written, with an extension PIL saves; else CondloraError."""
    return check_output_file(path, what, IMAGE_SUFFIXES)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    scaled = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def tile_grid(images: torch.Tensor, nrow: int = 10, scale: int = 4) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one uint8 (H', W', C) picture: rows of `nrow` images with a
    1-pixel white border, every pixel repeated `scale` times in both directions."""
    nrow = max(1, nrow)
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, col = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = img
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10, scale: int = 4) -> Path:
    """Tile images (rows of `nrow`) with a 1-pixel border, upscale by `scale`, save an image.

    The format follows the extension (see IMAGE_SUFFIXES); the file is written atomically.
    """
    path = check_image_path(path, "image file")
    grid = tile_grid(images, nrow, scale)
    c = grid.shape[2]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        Image.fromarray(grid[..., 0] if c == 1 else grid).save(tmp, format=_format(path))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _format(path: Path) -> str:
    """PIL's format name for the file's extension."""
    Image.init()
    return Image.registered_extensions()[path.suffix.lower()]
