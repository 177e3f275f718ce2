"""Handwriting styles: a "subject" of the demo is four continuous factors applied to every digit.

    thickness t in [-1, 1]  stroke width: x + t (dilate(x) - x) for t > 0, erode for t < 0
                            (grey dilation / erosion with a flat 3x3 element; |t| blends one step)
    slant k                 horizontal shear x -> x - k y (y points down: k > 0 leans right)
    rotation a (degrees)    counter-clockwise as seen on screen
    scale s                 zoom about the centre

The geometry is one affine map of normalised coordinates (align_corners=False, centre 0):
    p_out = s * Rot(a) @ Shear(k) @ p_in,   Rot(a) = [[cos a, sin a], [-sin a, cos a]]
(y points down, so this matrix turns counter-clockwise on screen), sampled bilinearly with
background -1 outside the image; the stroke width is changed after it, in output pixels.
Images are in [-1, 1] (background -1) and stay there: bilinear weights, max / min filters
and convex blends never leave the range of their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from condlora.core.errors import DataError

FACTORS = ("thickness", "slant", "rotation", "scale")


@dataclass(frozen=True)
class StyleRanges:
    """The range each factor is drawn from (uniformly)."""

    thickness: tuple[float, float] = (-0.7, 0.7)  # fraction of one 3x3 dilation (< 0: erosion)
    slant: tuple[float, float] = (-0.3, 0.3)  # shear coefficient k
    rotation: tuple[float, float] = (-12.0, 12.0)  # degrees
    scale: tuple[float, float] = (0.8, 1.05)  # zoom factor

    def bounds(self) -> Tensor:
        """(4, 2): low and high of each factor, in FACTORS order."""
        return torch.tensor([getattr(self, name) for name in FACTORS], dtype=torch.float32)


def sample_styles(n: int, ranges: StyleRanges, seed: int) -> Tensor:
    """(n, 4) styles drawn uniformly from the ranges with a seeded generator."""
    bounds = ranges.bounds()
    u = torch.rand(n, len(FACTORS), generator=torch.Generator().manual_seed(seed))
    return bounds[:, 0] + u * (bounds[:, 1] - bounds[:, 0])


def normalise_styles(styles: Tensor, ranges: StyleRanges) -> Tensor:
    """Styles mapped linearly to [-1, 1] per factor (the encoder's regression target)."""
    bounds = ranges.bounds()
    return 2 * (styles - bounds[:, 0]) / (bounds[:, 1] - bounds[:, 0]) - 1


def affine_matrices(styles: Tensor) -> Tensor:
    """(N, 2, 2) forward maps s * Rot(a) @ Shear(k) of normalised coordinates."""
    k, a, s = styles[:, 1], torch.deg2rad(styles[:, 2]), styles[:, 3]
    cos, sin = torch.cos(a), torch.sin(a)
    rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    one, zero = torch.ones_like(k), torch.zeros_like(k)
    shear = torch.stack([torch.stack([one, -k], -1), torch.stack([zero, one], -1)], -2)
    return s[:, None, None] * rot @ shear


def warp(images: Tensor, styles: Tensor) -> Tensor:
    """The geometric part of the styles (slant, rotation, scale), background -1."""
    forward = affine_matrices(styles).to(images)
    theta = torch.cat([torch.linalg.inv(forward), forward.new_zeros(len(forward), 2, 1)], dim=2)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # sample (x + 1), zero outside, so the background stays exactly -1
    return F.grid_sample(images + 1, grid, mode="bilinear", align_corners=False) - 1


def dilate(images: Tensor) -> Tensor:
    """Grey dilation with a flat 3x3 element (max over each pixel's neighbourhood)."""
    return F.max_pool2d(images, 3, stride=1, padding=1)


def erode(images: Tensor) -> Tensor:
    """Grey erosion with a flat 3x3 element (min over each pixel's neighbourhood)."""
    return -F.max_pool2d(-images, 3, stride=1, padding=1)


def thicken(images: Tensor, thickness: Tensor) -> Tensor:
    """x + t (dilate(x) - x) for t > 0, x + |t| (erode(x) - x) for t < 0, per image."""
    t = thickness.to(images).reshape(-1, 1, 1, 1)
    target = torch.where(t > 0, dilate(images), erode(images))
    return images + t.abs() * (target - images)


def apply_style(images: Tensor, styles: Tensor) -> Tensor:
    """(N, 1, R, R) images in [-1, 1] in the styles (N, 4) (or one style (4,) for all)."""
    if images.dim() != 4:
        raise DataError(f"styles apply to (N, C, R, R) images, got {tuple(images.shape)}")
    styles = styles.reshape(-1, len(FACTORS)).to(torch.float32)
    if len(styles) == 1:
        styles = styles.expand(len(images), -1)
    if len(styles) != len(images):
        raise DataError(f"{len(images)} images but {len(styles)} styles")
    return thicken(warp(images, styles), styles[:, 0]).clamp(-1, 1)


def describe(style: Tensor) -> str:
    """A one-line description of a style, e.g. 'thickness +0.40, slant -0.10, ...'."""
    units = {"rotation": " deg", "scale": "x"}
    return ", ".join(
        f"{name} {value:+.2f}{units.get(name, '')}"
        for name, value in zip(FACTORS, style.tolist(), strict=True)
    )
