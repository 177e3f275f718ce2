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

That per-LoRA sign rule is arbitrary across LoRAs: two LoRAs with nearly equal dW can get
opposite signs (or, when singular values cross, another order). Within a collection the
factors can instead be aligned to a shared reference: with the pair matrix P = [B'; A'^T]
((out + in) x r), any orthogonal R gives the same dW = (B' R)(R^T A'), and

    R = argmin_{R orthogonal} ||P R - P_ref||_F = W V^T  for  P^T P_ref = W S V^T

(orthogonal Procrustes, Schoenemann 1966) picks the signs, order and rotation of the pairs
closest to the reference, continuously in dW. The balanced form is kept: (RP)^T (RP) =
R^T diag(S) R for both factors.
"""

from __future__ import annotations

import math
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


def check_rank(weights: LoRAWeights, rank: int) -> None:
    """LoRAError unless 1 <= rank <= the largest rank a module's dW can have (before allocating
    factors of that rank)."""
    shapes = [m.delta_shape for m in weights.modules.values()]
    most = max((min(s[0], math.prod(s[1:])) for s in shapes), default=0)
    if rank < 1:
        raise LoRAError(f"rank must be at least 1, got {rank}")
    if shapes and rank > most:  # no modules (e.g. no text-encoder part): nothing to reduce
        raise LoRAError(
            f"rank {rank} is too large: no module's dW has a rank above {most} "
            f"(the smaller of its out and in features); use a rank in 1..{most}"
        )


def canonicalize(
    weights: LoRAWeights, rank: int | None = None
) -> tuple[LoRAWeights, dict[str, float]]:
    """Every module in canonical form (scale 1); also each module's dropped energy fraction."""
    if rank is not None:
        check_rank(weights, rank)
    modules, dropped = {}, {}
    for name, module in weights.modules.items():
        result = canonical_factors(module, rank)
        modules[name], dropped[name] = result.module, result.dropped_energy
    return weights.replace_modules(modules), dropped


def pair_matrix(module: ModuleLoRA) -> Tensor:
    """P = [B; A^T] ((out + in*k*k) x r, float64) of scale-1 factors (conv kernels flattened)."""
    if module.scale != 1.0:
        raise LoRAError(
            f"pair matrices are of scale-1 (canonical) factors, got scale {module.scale}"
        )
    a, b = (t.double() for t in module.matrices())
    return torch.cat([b, a.T])


def closest_rotation(m: Tensor) -> Tensor:
    """The orthogonal matrix nearest to a square m: W V^T for m = W S V^T (its polar factor)."""
    w, _, vh = torch.linalg.svd(m)
    return w @ vh


def rotate_pairs(module: ModuleLoRA, rotation: Tensor) -> ModuleLoRA:
    """(B R, R^T A): the same dW for an orthogonal R (r x r), in the module's own shapes."""
    a, b = (t.double() for t in module.matrices())
    r = rotation.double()
    dtype = module.A.dtype
    new_a = (r.T @ a).reshape(module.A.shape).to(dtype)
    new_b = (b @ r).reshape(module.B.shape).to(dtype)
    return ModuleLoRA(new_a, new_b, module.scale)


def align_factors(module: ModuleLoRA, reference: Tensor) -> ModuleLoRA:
    """Canonical factors rotated to a reference pair matrix ((out + in) x r): B' R, R^T A'
    with R = closest_rotation(P^T P_ref) (see the module docstring)."""
    p = pair_matrix(module)
    if reference.shape != p.shape:
        raise LoRAError(
            f"reference pairs of shape {tuple(reference.shape)}, expected {tuple(p.shape)}"
        )
    return rotate_pairs(module, closest_rotation(p.T @ reference.double()))
