"""The subject encoder, the demo's stand-in for a face-recognition network (ArcFace).

A small CNN reads one styled digit and regresses its four style factors (normalised to
[-1, 1]); its penultimate features, averaged over a set of images of one subject, centred
on the mean feature of random styled digits and L2-normalised, are the subject's embedding.
Sets of one subject then point the same way whatever digits they hold, and different
subjects point apart: cosine similarity of embeddings is the demo's identity score.

Trained on fresh random styles every step (not on the zoo's subjects), seeded, cached as
safetensors with its constructor config and the centre in the file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condlora.apps.synthesis_demo.styles import (
    FACTORS,
    StyleRanges,
    apply_style,
    normalise_styles,
    sample_styles,
)
from condlora.core.errors import DataError
from condlora.core.safetensors_io import read_weights, write_weights

FORMAT = "condlora.demo_subject_encoder"


class SubjectEncoder(nn.Module):
    """Conv stack -> `dim` features -> style factors; `embed`: image sets -> unit vectors."""

    def __init__(
        self,
        resolution: int = 16,  # input H = W (a multiple of 4)
        width: int = 16,  # channels of the first two convs (then 2x)
        dim: int = 64,  # embedding width
    ) -> None:
        super().__init__()
        if resolution % 4:
            raise DataError(f"encoder resolution must be a multiple of 4, got {resolution}")
        self.config = {"resolution": resolution, "width": width, "dim": dim}
        self.resolution = resolution
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),  # R/2
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),  # R/4
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(2 * width * (resolution // 4) ** 2, 4 * dim),
            nn.SiLU(),
            nn.Linear(4 * dim, dim),
        )
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(dim, len(FACTORS)))
        self.register_buffer("center", torch.zeros(dim))  # mean feature of random styles

    def features(self, images: Tensor) -> Tensor:
        """(N, 1, R, R) images in [-1, 1] -> (N, dim) features."""
        if images.dim() != 4 or images.shape[1:] != (1, self.resolution, self.resolution):
            r = self.resolution
            raise DataError(f"the encoder takes (N, 1, {r}, {r}) images, got {tuple(images.shape)}")
        return self.body(images.clamp(-1, 1))

    def forward(self, images: Tensor) -> Tensor:
        """Predicted normalised style factors (N, 4)."""
        return self.head(self.features(images))

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """One set of images of one subject -> its unit-norm embedding (dim,)."""
        return self.embed_sets(images[None])[0]

    @torch.no_grad()
    def embed_sets(self, sets: Tensor) -> Tensor:
        """(S, n, 1, R, R): S sets of n images -> (S, dim) unit-norm embeddings."""
        s, n = sets.shape[:2]
        feats = self.features(sets.reshape(s * n, *sets.shape[2:]).float()).reshape(s, n, -1)
        return F.normalize(feats.mean(dim=1) - self.center, dim=1)


def train_encoder(
    images: Tensor,
    ranges: StyleRanges,
    steps: int = 800,
    batch_size: int = 64,
    seed: int = 0,
    dim: int = 64,
) -> SubjectEncoder:
    """Train an encoder on the digits in random styles (a fresh style per image); eval mode.

    AdamW with linear decay; seeded (the global RNG is left as it was). The centre is the mean
    feature of 2,000 random styled digits. Wall time in `model.train_seconds`.
    """
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SubjectEncoder(images.shape[-1], dim=dim)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    for step in range(steps):
        x, target = _styled_batch(images, ranges, batch_size, generator, seed + 1 + step)
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        x, _ = _styled_batch(images, ranges, 2000, generator, seed)
        model.center.copy_(model.features(x).mean(dim=0))
    model.train_seconds = time.perf_counter() - start
    return model


def _styled_batch(
    images: Tensor, ranges: StyleRanges, n: int, generator: torch.Generator, style_seed: int
) -> tuple[Tensor, Tensor]:
    """n random digits, each in its own random style, and the normalised factors."""
    index = torch.randint(0, len(images), (n,), generator=generator)
    styles = sample_styles(n, ranges, style_seed)
    return apply_style(images[index], styles), normalise_styles(styles, ranges)


def save_encoder(model: SubjectEncoder, path: str | Path) -> None:
    """Weights (and the centre) to a safetensors file; the constructor config in its metadata."""
    metadata = {"format": FORMAT, "config": json.dumps(model.config)}
    write_weights(path, model.state_dict(), metadata)


def load_encoder(path: str | Path) -> SubjectEncoder:
    """A SubjectEncoder from `save_encoder`'s file (eval mode, CPU)."""
    metadata, state = read_weights(path, FORMAT, "demo subject encoder file", DataError)
    model = SubjectEncoder(**json.loads(metadata["config"]))
    model.load_state_dict(state)
    return model.eval()
