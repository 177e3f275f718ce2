"""Low-rank factors of an exact dW by SVD: for other kinds (LoHa, LoKr, full, Tucker) written
as plain LoRA, and for `lora resize` / `lora merge`.

dW (conv kernels flattened to [out, in*k*k]) = U S V^T; the best rank-R approximation in the
Frobenius norm keeps the R largest singular values (Eckart-Young), with relative error
sqrt(sum_{i>R} s_i^2) / sqrt(sum_i s_i^2). Factors: B = U_R sqrt(S_R), A = sqrt(S_R) V_R^T.
"""

from __future__ import annotations

import torch
from torch import Tensor

from condlora.core.errors import LoRAError
from condlora.lora.formats.keys import is_text_module
from condlora.lora.formats.kinds import ModuleDelta
from condlora.lora.formats.weights import LoRAWeights, ModuleLoRA

NUMERICAL_RANK_TOL = 1e-7  # singular values below this x the largest count as zero


def choose_rank(s: Tensor, rank: int | None, energy: float | None) -> int:
    """R from a fixed rank, an energy fraction (smallest R with sum_{i<=R} s_i^2 >= energy
    sum s_i^2), or else the numerical rank; at least 1, at most len(s)."""
    if rank is not None:
        return max(1, min(rank, len(s)))
    if energy is not None:
        kept = torch.cumsum(s**2, 0) / (s**2).sum().clamp(min=1e-300)
        return max(1, min(int((kept < energy).sum()) + 1, len(s)))
    return max(1, int((s > s[0] * NUMERICAL_RANK_TOL).sum()))


def lowrank(
    delta: Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[ModuleLoRA, float]:
    """(a rank-R ModuleLoRA of scale 1 in dW's shape, relative Frobenius error)."""
    shape = tuple(delta.shape)
    u, s, vh = torch.linalg.svd(delta.double().reshape(shape[0], -1), full_matrices=False)
    r = choose_rank(s, rank, energy)
    total = float((s**2).sum())
    err = float((s[r:] ** 2).sum() / total) ** 0.5 if total > 0 else 0.0
    root = s[:r].sqrt()
    B, A = (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()
    if len(shape) == 4:
        A, B = A.reshape(r, *shape[1:]), B.reshape(shape[0], r, 1, 1)
    return ModuleLoRA(A, B, 1.0), err


def check_choice(rank: int | None, energy: float | None) -> None:
    """LoRAError for a rank below 1 or an energy fraction outside (0, 1]."""
    if rank is not None and rank < 1:
        raise LoRAError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise LoRAError(f"--energy must be in (0, 1], got {energy}")


def exact_delta(name: str, m: ModuleDelta) -> Tensor:
    """A module's exact dW in its weight's shape; LoRAError for DoRA or an unknown shape."""
    if not m.exact:
        raise LoRAError(
            f"module {name} is {m.describe()}: its update depends on the base weight "
            "(DoRA), so a plain LoRA layout cannot hold it"
        )
    if m.ambiguous_shape:
        raise LoRAError(
            f"module {name} is {m.describe()}, whose conv kernels are stored flattened: pass "
            "--base-modules with shapes (the base model's .safetensors or U-Net config.json)"
        )
    return m.delta()


def _other_deltas(weights: LoRAWeights) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(exact dW of each module of another kind that a plain LoRA can hold, what it cannot:
    key -> reason)."""
    deltas, lost = {}, {}
    for name, m in weights.others.items():
        delta = exact_delta(name, m)
        if delta.dim() < 2:
            lost[name] = "1-d weight update (a norm layer): a plain LoRA cannot hold it"
            continue
        if "diff_b" in m.parts:
            lost[f"{name}.diff_b"] = "bias update: a plain LoRA cannot hold it"
        deltas[name] = delta
    return deltas, lost


def _lowrank_all(
    deltas: dict[str, Tensor], rank: int | None, energy: float | None
) -> tuple[dict[str, ModuleLoRA], dict[str, float]]:
    """Every dW by SVD: (name -> ModuleLoRA, name -> relative error)."""
    pairs, errors = {}, {}
    for name, delta in sorted(deltas.items()):
        pairs[name], errors[name] = lowrank(delta, rank, energy)
    return pairs, errors


def _assemble(like: LoRAWeights, pairs: dict[str, ModuleLoRA], lost: dict[str, str]) -> LoRAWeights:
    """A plain LoRA of these modules (U-Net and text encoders), names and hints as in `like`,
    with `lost` added to the keys it does not hold."""
    out = like.replace_modules({n: m for n, m in pairs.items() if not is_text_module(n)})
    out.text_encoder = {n: m for n, m in pairs.items() if is_text_module(n)}
    out.others, out.unmapped = {}, {**like.unmapped, **lost}
    return out


def as_plain_lora(
    weights: LoRAWeights, rank: int | None = None, energy: float | None = None
) -> tuple[LoRAWeights, dict[str, float]]:
    """Every module of another kind as a plain LoRA from its exact dW (DoRA: LoRAError), the
    plain ones kept as they are; returns the LoRA and each converted module's relative error."""
    deltas, lost = _other_deltas(weights)
    pairs, errors = _lowrank_all(deltas, rank, energy)
    return _assemble(weights, {**weights.modules, **weights.text_encoder, **pairs}, lost), errors


def _all_deltas(weights: LoRAWeights) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The exact dW of every module (U-Net, text encoders, other kinds), and what is lost."""
    deltas, lost = _other_deltas(weights)
    deltas |= {name: m.delta() for name, m in {**weights.modules, **weights.text_encoder}.items()}
    return deltas, lost


def resize(
    weights: LoRAWeights, rank: int | None = None, energy: float | None = None
) -> tuple[LoRAWeights, dict[str, float]]:
    """Every module re-factorised from its exact dW at a rank or energy; relative errors."""
    check_choice(rank, energy)
    deltas, lost = _all_deltas(weights)
    pairs, errors = _lowrank_all(deltas, rank, energy)
    return _assemble(weights, pairs, lost), errors


def merge(
    loras: list[LoRAWeights],
    coefficients: list[float],
    rank: int | None = None,
    energy: float | None = None,
) -> tuple[LoRAWeights, dict[str, float]]:
    """sum_i c_i dW_i per module (a module missing from a LoRA counts as 0), re-factorised;
    relative errors against the exact weighted sum. Unmapped keys of all LoRAs are kept."""
    check_choice(rank, energy)
    if len(coefficients) != len(loras):
        raise LoRAError(f"{len(loras)} LoRAs but {len(coefficients)} weights")
    if len({w.resolved for w in loras}) > 1:
        raise LoRAError("some LoRAs have kohya stems for names: pass --base-modules")
    total: dict[str, Tensor] = {}
    lost = {k: v for w in loras[1:] for k, v in w.unmapped.items()}
    for weights, c in zip(loras, coefficients, strict=True):
        deltas, lost_here = _all_deltas(weights)
        lost |= lost_here
        for name, delta in deltas.items():
            if name in total and total[name].numel() != delta.numel():
                raise LoRAError(f"module {name}: dW shapes differ between the LoRAs")
            delta = c * delta.double()
            total[name] = total[name] + delta.reshape(total[name].shape) if name in total else delta
    pairs, errors = _lowrank_all({k: v.float() for k, v in total.items()}, rank, energy)
    return _assemble(loras[0], pairs, lost), errors
