"""Images a visitor gives (uploaded files, canvas drawings) turned into the demo's digits.

Every check happens before any pixel is decoded: the number of files, each file's size on
disk, then its format and dimensions as PIL reads them from the header. A bad file raises
DataError with one line naming it, which the page shows.

A picture becomes a digit as the embedded data set draws them: grey levels, bright strokes
on a dark background (a light background is inverted), the strokes' bounding box centred in
a square with a margin, then resized to R x R with antialiasing, in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from condlora.core.errors import DataError

MAX_FILES = 32  # images per upload
MAX_BYTES = 2 * 1024 * 1024  # per file, checked on disk before it is opened
MIN_SIDE, MAX_SIDE = 8, 2048  # pixels, each side
FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF", "WEBP", "TIFF")  # what PIL may decode
INK_LEVEL = 0.25  # grey level (0..1, after inversion) above which a pixel counts as ink
MARGIN = 0.15  # empty border around the strokes, as a fraction of the square's side


def check_count(paths: list[str | Path]) -> None:
    """DataError unless 1..MAX_FILES files were given."""
    if not paths:
        raise DataError("no images: upload at least one image (PNG, JPEG, ...)")
    if len(paths) > MAX_FILES:
        raise DataError(f"too many images: {len(paths)} uploaded, at most {MAX_FILES}")


def read_grey(path: str | Path) -> np.ndarray:
    """An uploaded image as grey levels (H, W) in [0, 1]; DataError if it is not a usable one."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise DataError(f"{path.name} is too large: {size / 2**20:.1f} MB, at most 2 MB per image")
    try:
        with Image.open(path) as image:
            if image.format not in FORMATS:
                raise DataError(f"{path.name} is a {image.format} image: use {', '.join(FORMATS)}")
            width, height = image.size
            if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
                raise DataError(
                    f"{path.name} is {width} x {height} pixels: each side must be "
                    f"{MIN_SIDE} to {MAX_SIDE}"
                )
            grey = _flatten_alpha(image)
    except Image.DecompressionBombError:  # PIL's guard, from the header's dimensions
        raise DataError(
            f"{path.name} is too large: more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, each "
            f"side must be {MIN_SIDE} to {MAX_SIDE}"
        ) from None
    except UnidentifiedImageError:
        raise DataError(f"{path.name} is not an image (PNG, JPEG, ...)") from None
    except OSError as err:
        raise DataError(f"{path.name} is a damaged image ({err})") from None
    return grey


def _flatten_alpha(image: Image.Image) -> np.ndarray:
    """Grey levels in [0, 1]; transparent pixels count as white paper."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    grey = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    alpha = rgba[..., 3]
    return grey * alpha + (1.0 - alpha)


def drawing_grey(value: object) -> np.ndarray | None:
    """The canvas of gradio's Sketchpad (a dict with an RGBA "composite") as grey levels, or
    None when nothing was drawn."""
    composite = value.get("composite") if isinstance(value, dict) else value
    if composite is None:
        return None
    rgba = np.asarray(composite, dtype=np.float32)
    if rgba.ndim != 3 or rgba.shape[2] not in (3, 4):
        raise DataError(f"the canvas has an unexpected shape {rgba.shape}")
    rgba = rgba / 255.0 if rgba.max() > 1.0 else rgba
    if rgba.shape[2] == 3:
        rgba = np.concatenate([rgba, np.ones_like(rgba[..., :1])], axis=2)
    grey = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = grey * rgba[..., 3] + (1.0 - rgba[..., 3])
    return None if float(grey.min()) > 1.0 - INK_LEVEL else grey


def to_digit(grey: np.ndarray, resolution: int, name: str = "the image") -> Tensor:
    """Grey levels (H, W) in [0, 1] -> one digit (1, R, R) in [-1, 1], bright ink on dark."""
    ink = np.asarray(grey, dtype=np.float32)
    border = np.concatenate([ink[0], ink[-1], ink[:, 0], ink[:, -1]])
    if float(border.mean()) > 0.5:  # light paper: dark strokes become bright
        ink = 1.0 - ink
    rows, cols = np.nonzero(ink > INK_LEVEL)
    if len(rows) == 0:
        raise DataError(f"{name} is blank: no strokes found")
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    side = int(round(max(ink.shape) / (1.0 - 2 * MARGIN)))
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - ink.shape[0]) // 2, (side - ink.shape[1]) // 2
    square[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    x = torch.from_numpy(square)[None, None]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True)
    x = x / x.max().clamp(min=1e-6)  # full contrast, as the digits span 0..16
    return (x[0] * 2 - 1).clamp(-1, 1)


def load_uploads(paths: list[str | Path], resolution: int) -> Tensor:
    """Uploaded image files -> digits (N, 1, R, R) in [-1, 1]; DataError on the first bad one."""
    check_count(paths)
    digits = [to_digit(read_grey(p), resolution, Path(p).name) for p in paths]
    return torch.stack(digits)


class DigitsEncoder:
    """The digits demo's subject encoder on image files, read as the page reads uploads:
    `synth generate --images DIR --encoder digits --encoder-path DEMO/encoder.safetensors`
    gives the embedding that the page gives for the same files (registered as kind "digits"
    by `condlora.cli`). `path`: the encoder file, or the demo folder holding it."""

    def __init__(self, path: str | Path) -> None:
        from condlora.apps.synthesis_demo.encoder import load_encoder

        if not str(path):
            raise DataError(
                "the digits encoder needs --encoder-path: a digits demo's encoder.safetensors "
                "(or the demo folder)"
            )
        path = Path(path)
        file = path / "encoder.safetensors" if path.is_dir() else path
        if not file.is_file():
            raise DataError(
                f"no digits demo encoder at {file}: make one with `condlora synth demo`"
            )
        self.model = load_encoder(file)
        self.dim = self.model.config["dim"]

    def digits(self, paths: list[Path]) -> Tensor:
        """The images as digits (N, 1, R, R), as the page reads an upload."""
        return torch.stack([to_digit(read_grey(p), self.model.resolution, p.name) for p in paths])

    def __call__(self, paths: list[Path]) -> Tensor:
        """One image per row: the centred, unit-norm feature (n, dim)."""
        return torch.stack([self.model.embed(d[None]) for d in self.digits(paths)])

    def embed_subject(self, paths: list[Path]) -> Tensor:
        """The subject's embedding (dim,) from all its images, as the page embeds a set."""
        return self.model.embed(self.digits(paths))
