"""EDM's geometric augmentation (Karras et al. 2022, App. F.2) and its 9 augment labels.

Each augmentation is applied to each image independently, with probability
min(multiplier * p, 1): x and y flips (exact pixel flips, each a coin flip when applied),
then one affine map per image made of isotropic scaling, rotation, anisotropic scaling and
fractional translation, in that order. The network is conditioned on what was done, so that
at sampling time it can be asked for no augmentation (all-zero labels) (EDM App. F.2):

    [xflip, yflip, scale, cos(angle) - 1, sin(angle), aniso * cos(axis), aniso * sin(axis),
     translate_x, translate_y]

scale, aniso and translate_* are the standard-normal draws behind the transform (the scale
is 2^(scale_std * draw)); an entry is 0 where its augmentation was not applied. The signs
are EDM's: a transform gets the label vector EDM's pipe gives it (`AugmentPipe.geometry`),
so nets trained by EDM read the labels as they were trained to.

The affine map is resampled with bilinear `grid_sample` and reflection padding. This
approximates EDM's resampling, which pads by reflection, upsamples 2x with a wavelet
low-pass filter, samples bilinearly and filters down again (less aliasing than ours).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from condlora.core.errors import ConfigError, DataError

AUGMENT_DIM = 9  # length of the augment label vector


# --- affine maps in pixel coordinates (x right, y down, origin at the image centre) ------------


def rotation(angle: Tensor) -> Tensor:
    """(N, 3, 3) rotations; a positive angle turns the content clockwise as displayed."""
    c, s = angle.cos(), angle.sin()
    z, o = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=1).reshape(-1, 3, 3)


def scaling(sx: Tensor, sy: Tensor) -> Tensor:
    """(N, 3, 3) scalings by sx along x and sy along y."""
    z, o = torch.zeros_like(sx), torch.ones_like(sx)
    return torch.stack([sx, z, z, z, sy, z, z, z, o], dim=1).reshape(-1, 3, 3)


def translation(tx: Tensor, ty: Tensor) -> Tensor:
    """(N, 3, 3) translations by (tx, ty) pixels."""
    z, o = torch.zeros_like(tx), torch.ones_like(tx)
    return torch.stack([o, z, tx, z, o, ty, z, z, o], dim=1).reshape(-1, 3, 3)


def affine_warp(images: Tensor, matrices: Tensor) -> Tensor:
    """Move each image's content by its (N, 3, 3) pixel-space map; bilinear, reflection padding."""
    _, _, h, w = images.shape
    # output pixel q shows input pixel G^-1 q; affine_grid wants that map in [-1, 1] units,
    # whose scale is half the image size (align_corners=False: +-1 are the outer pixel edges)
    to_unit = scaling(matrices.new_full((1,), 2 / w), matrices.new_full((1,), 2 / h))
    theta = to_unit @ torch.linalg.inv(matrices) @ torch.linalg.inv(to_unit)
    grid = F.affine_grid(theta[:, :2].to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )


# --- the pipeline ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentPipe:
    """EDM augmentation; the defaults are EDM's CIFAR-10 setting (p = 0.12, App. F.2).

    pipe(images, generator) -> (augmented images, augment labels (N, 9)); images are
    (N, C, H, W) in [-1, 1]. The same generator state gives the same output.
    """

    p: float = 0.12  # overall strength: each augmentation applies with min(multiplier * p, 1)
    xflip: float = 1e8  # multipliers per augmentation (1e8: always, so xflip is a plain coin)
    yflip: float = 1.0
    scale: float = 1.0
    rotate_frac: float = 1.0
    aniso: float = 1.0
    translate_frac: float = 1.0
    scale_std: float = 0.2  # std of log2 of the isotropic scale
    rotate_frac_max: float = 1.0  # largest |angle|, as a fraction of pi
    aniso_std: float = 0.2  # std of log2 of the anisotropic scale
    aniso_rotate_prob: float = 0.5  # probability that the anisotropy axis is turned at random
    translate_frac_std: float = 0.125  # std of the translation, as a fraction of the image size

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) >= 0:
                raise ConfigError(f"augment.{f.name} must be >= 0, got {getattr(self, f.name)}")

    def probabilities(self) -> Tensor:
        """(6,) probability that each of xflip, yflip, scale, rotate, aniso, translate applies."""
        mult = [self.xflip, self.yflip, self.scale, self.rotate_frac, self.aniso]
        mult.append(self.translate_frac)
        return (torch.tensor(mult, dtype=torch.float64) * self.p).clamp(max=1).float()

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(augmented images, augment labels (N, 9)), labels zero where nothing was applied."""
        if images.ndim != 4:
            raise DataError(f"AugmentPipe takes images (N, C, H, W), got {tuple(images.shape)}")
        n, _, h_px, w_px = images.shape
        # 1. every random number, drawn whatever is enabled (the generator always advances alike)
        dev = generator.device if generator is not None else images.device
        applied = torch.rand(n, 6, generator=generator, device=dev) < self.probabilities().to(dev)
        coins = torch.randint(0, 2, (n, 2), generator=generator, device=dev)
        normal = torch.randn(n, 4, generator=generator, device=dev)
        uniform = torch.rand(n, 3, generator=generator, device=dev)
        applied, coins = applied.to(images.device), coins.to(images.device)
        normal, uniform = normal.to(images.device), uniform.to(images.device)
        # 2. exact pixel flips (EDM: "pixel blitting")
        flip = coins * applied[:, :2]
        out = torch.where(flip[:, 0, None, None, None] == 1, images.flip(3), images)
        out = torch.where(flip[:, 1, None, None, None] == 1, out.flip(2), out)
        # 3. the geometric draws, zero where not applied (EDM's rotation w and axis r)
        draw_s = normal[:, 0] * applied[:, 2]
        w = (2 * uniform[:, 0] - 1) * math.pi * self.rotate_frac_max * applied[:, 3]
        draw_a = normal[:, 1] * applied[:, 4]
        r = (2 * uniform[:, 1] - 1) * math.pi * (uniform[:, 2] < self.aniso_rotate_prob)
        draws = torch.stack([draw_s, w, draw_a, r, *(normal[:, 2:] * applied[:, 5:]).T], dim=1)
        # 4. one map per image (scale, rotate, stretch along r, translate) and its labels
        size = torch.tensor([w_px, h_px], device=images.device, dtype=torch.float32)
        G, geo_labels = self.geometry(draws, size * self.translate_frac_std)
        moved = applied[:, 2:].any(dim=1)  # leave untouched images exactly as they were
        if moved.any():
            out = out.clone()
            out[moved] = affine_warp(out[moved], G[moved])
        return out, torch.cat([flip.to(geo_labels.dtype), geo_labels], dim=1).float()

    def geometry(self, draws: Tensor, translate_px: Tensor) -> tuple[Tensor, Tensor]:
        """(content maps (N, 3, 3), augment labels 2..8 (N, 7)) for EDM's draws.

        draws (N, 6) = [s, w, a, r, t_x, t_y] as EDM's AugmentPipe names them: isotropic scale
        2^(scale_std s), rotation angle w, anisotropic scale 2^(aniso_std a) along an axis
        turned by r, translation (t_x, t_y) * translate_px. EDM builds the inverse map
        G_inv = S(s)^-1 R(w) R(-r) S_a(a)^-1 R(r) T^-1, R(theta) = [[cos, -sin], [sin, cos]],
        and labels it [s, cos w - 1, sin w, a cos r, a sin r, t_x, t_y]; here G = G_inv^-1.
        """
        s, w, a, r, tx, ty = draws.unbind(1)
        iso = 2 ** (self.scale_std * s)
        ani = 2 ** (self.aniso_std * a)
        G = (
            translation(tx * translate_px[0], ty * translate_px[1])
            @ rotation(-r)
            @ scaling(ani, 1 / ani)
            @ rotation(r)
            @ rotation(-w)
            @ scaling(iso, iso)
        )
        labels = [s, w.cos() - 1, w.sin(), a * r.cos(), a * r.sin(), tx, ty]
        return G, torch.stack(labels, dim=1)
