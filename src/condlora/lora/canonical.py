"""Canonical LoRA factors: one (A, B) per dW, whatever basis or scale the LoRA was trained in.

For dW = s B A (conv kernels flattened to [out, in*k*k]) the thin SVD comes from the factors,
never from dW itself:

    B = Q_b R_b,  A^T = Q_a R_a            (QR, both with r columns)
    s R_b R_a^T = U' S V'^T                (an r x r SVD)
    dW = (Q_b U') S (Q_a V')^T = U S V^T
    B' = U sqrt(S),  A' = sqrt(S) V^T

Each singular pair (u_i, v_i) is only fixed up to a common sign; we make the largest-magnitude
entry of every u_i positive. (B R, R^-1 A) and (c B, A / c) give the same dW, hence the same
U, S, V and the same canonical factors (up to ties in S).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from condlora.core.errors import LoRAError
from condlora.lora.formats.weights import LoRAWeights, ModuleLoRA


@dataclass(frozen=True)
class Canonical:
    """Canonical factors of one module (scale 1) and what truncation dropped."""

    module: ModuleLoRA  # B' = U sqrt(S), A' = sqrt(S) V^T, in the LoRA's own (conv) shapes
    singular_values: Tensor  # all min(r, out, in) singular values of dW, descending
    dropped_energy: float  # fraction of ||dW||_F^2 in the dropped singular pairs


def fix_signs(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Flip pairs (u_i, v_i) so that the largest-magnitude entry of each u_i is positive."""
    rows = u.abs().argmax(dim=0)
    signs = torch.sign(u[rows, torch.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs, v * signs


def canonical_factors(module: ModuleLoRA, rank: int | None = None) -> Canonical:
    """The canonical (A', B') of dW = scale * B A; `rank` keeps the top pairs (pads with 0)."""
    rank = module.rank if rank is None else rank
    if rank < 1:
        raise LoRAError(f"rank must be at least 1, got {rank}")
    a, b = (t.double() for t in module.matrices())
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u_small, s, vh_small = torch.linalg.svd(module.scale * r_b @ r_a.T, full_matrices=False)
    u, v = fix_signs(q_b @ u_small, q_a @ vh_small.T)
    kept = min(rank, s.numel())
    total = float((s**2).sum())
    dropped = float((s[kept:] ** 2).sum()) / total if total > 0 else 0.0
    root = s[:kept].sqrt()
    new_b = torch.zeros(b.shape[0], rank, dtype=torch.float64)
    new_a = torch.zeros(rank, a.shape[1], dtype=torch.float64)
    new_b[:, :kept] = u[:, :kept] * root
    new_a[:kept] = root[:, None] * v[:, :kept].T
    dtype = torch.promote_types(module.A.dtype, torch.float32)
    if module.is_conv:
        new_a = new_a.reshape(rank, *module.A.shape[1:])
        new_b = new_b.reshape(b.shape[0], rank, 1, 1)
    return Canonical(ModuleLoRA(new_a.to(dtype), new_b.to(dtype), 1.0), s.to(dtype), dropped)


def canonicalize(
    weights: LoRAWeights, rank: int | None = None
) -> tuple[LoRAWeights, dict[str, float]]:
    """Every module in canonical form (scale 1); also each module's dropped energy fraction."""
    modules, dropped = {}, {}
    for name, module in weights.modules.items():
        result = canonical_factors(module, rank)
        modules[name], dropped[name] = result.module, result.dropped_energy
    canonical = LoRAWeights(
        modules, weights.layout, weights.text_encoder, weights.resolved, weights.hints
    )
    return canonical, dropped
