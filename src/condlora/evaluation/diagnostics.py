"""Diagnostics from the LoRA-conditioning paper, on a trained denoiser.

- TimeLoRA: how smooth the learned composition table is over time, as the cosine similarity
  of neighbouring rows w(t_k), w(t_{k+1}) (the paper finds neighbouring timesteps share
  nearly the same mixture after training).
- ClassLoRA: what happens between and beyond the classes, by feeding float class weights:
  y = s * onehot(k) for a scale s from 0 to 2 (interpolation towards "no class", then
  extrapolation), and y = (1 - a) onehot(i) + a onehot(j) between two classes. The weights
  reach every path that reads the class: ClassLoRA, and the backbone's own class embedding
  when the model keeps scale-and-shift (a bias-free Linear on the weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from condlora.diffusion import Denoiser
from condlora.image.config import Config
from condlora.image.generate import generate
from condlora.lora import ClassComposer, TimeComposer, hat_table

SCALES = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
MIX = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]


def neighbour_cosine(table: torch.Tensor) -> torch.Tensor:
    """(T, m) table -> (T - 1,) cosine similarity of rows k and k + 1."""
    table = table.detach().float()
    return F.cosine_similarity(table[:-1], table[1:], dim=1)


def time_tables(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every TimeLoRA table (T, m) inside `model`, by the composer's module name."""
    return {n: m.omega.detach() for n, m in model.named_modules() if isinstance(m, TimeComposer)}


def time_similarity(model: nn.Module) -> dict | None:
    """Neighbouring-row cosine of the TimeLoRA tables: mean and min over layers (None: no table).

    "mean" averages each layer's mean over rows; "min" is the smallest value of any layer.
    "init_mean" / "init_min" are the same figures for the hat-function initialisation, and
    "change" is |Omega - Omega_init| / |Omega_init| (Frobenius), averaged over layers.
    """
    tables = time_tables(model)
    if not tables:
        return None
    per_layer = {name: neighbour_cosine(t) for name, t in tables.items()}
    shape = next(iter(tables.values())).shape
    start = hat_table(*shape)
    init = neighbour_cosine(start)
    change = [float((t.float().cpu() - start).norm() / start.norm()) for t in tables.values()]
    return {
        "layers": len(per_layer),
        "mean": float(torch.stack([c.mean() for c in per_layer.values()]).mean()),
        "min": float(min(c.min() for c in per_layer.values())),
        "init_mean": float(init.mean()),
        "init_min": float(init.min()),
        "change": sum(change) / len(change),
    }


def has_class_lora(model: nn.Module) -> bool:
    """Whether `model` holds a ClassLoRA composer."""
    return any(isinstance(m, ClassComposer) for m in model.modules())


def class_mix_weights(i: int, j: int, alphas: Sequence[float], num_classes: int) -> torch.Tensor:
    """(len(alphas), K) float class weights (1 - a) onehot(i) + a onehot(j)."""
    a = torch.tensor([float(x) for x in alphas])[:, None]
    eye = torch.eye(num_classes)
    return (1 - a) * eye[i] + a * eye[j]


@torch.no_grad()
def sweep_grid(
    denoiser: Denoiser, cfg: Config, columns: Sequence[torch.Tensor], seed: int = 0
) -> torch.Tensor:
    """Images for a grid: column c samples its (rows, K) class weights, row-major output.

    Every column is sampled with the same seed and batch size, so row r starts from the same
    noise in every column: only the class weights change along a row.
    """
    rows = len(columns[0])
    images = [generate(denoiser, cfg, rows, w.float(), seed=seed) for w in columns]
    grid = torch.stack(images, dim=1)  # (rows, cols, C, H, W)
    return grid.reshape(rows * len(columns), *grid.shape[2:])


def class_scale_grid(
    denoiser: Denoiser, cfg: Config, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, int]:
    """(images, number of columns): row k is class k, columns scale s in SCALES (0 to 2)."""
    columns = [s * torch.eye(num_classes) for s in SCALES]
    return sweep_grid(denoiser, cfg, columns, seed), len(columns)


def class_mix_grid(
    denoiser: Denoiser, cfg: Config, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, int]:
    """(images, number of columns): row k goes from class k to class k+1 (mod K) along MIX."""
    pairs = [(k, (k + 1) % num_classes) for k in range(num_classes)]
    columns = [
        torch.stack([class_mix_weights(i, j, [a], num_classes)[0] for i, j in pairs]) for a in MIX
    ]
    return sweep_grid(denoiser, cfg, columns, seed), len(columns)
