"""Canonical SVD form of LoRA factors, and the flat layout spec that maps vectors back."""

import math

import pytest
import torch

from condlora.core.errors import DataError, LoRAError
from condlora.lora.canonical import (
    align_factors,
    canonical_factors,
    canonicalize,
    pair_matrix,
    rotate_pairs,
)
from condlora.lora.formats import LoRAWeights, ModuleLoRA
from condlora.synthesis.flatten import FlatSpec


def random_module(seed, out=12, inp=9, rank=3, kernel=None, scale=1.7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a_shape = (rank, inp, kernel, kernel) if kernel else (rank, inp)
    b_shape = (out, rank, 1, 1) if kernel else (out, rank)
    A = torch.randn(a_shape, generator=g, dtype=dtype)
    B = torch.randn(b_shape, generator=g, dtype=dtype)
    return ModuleLoRA(A, B, scale)


def random_invertible(seed, r, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + seed)
    while True:
        R = torch.randn(r, r, generator=g, dtype=dtype)
        if torch.linalg.cond(R) < 50:
            return R


def transformed(module, R, c):
    """(c B R, R^-1 A / c) on the flattened factors: the same dW in another basis and scale."""
    a, b = module.matrices()
    new_a = (torch.linalg.solve(R, a) / c).reshape(module.A.shape)
    new_b = (c * b @ R).reshape(module.B.shape)
    return ModuleLoRA(new_a, new_b, module.scale)


def relative(x, y):
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize("kernel", [None, 3])
@pytest.mark.parametrize("seed", range(4))
def test_canonical_is_invariant_to_basis_and_scale(seed, kernel):
    module = random_module(seed, kernel=kernel)
    reference = canonical_factors(module).module
    R = random_invertible(seed, module.rank)
    for c in (1.0, -0.37, 5.0):
        for other in (
            transformed(module, R, 1.0),
            transformed(module, torch.eye(3, dtype=torch.float64), c),
        ):
            canon = canonical_factors(other).module
            torch.testing.assert_close(canon.A, reference.A, atol=1e-5, rtol=0)
            torch.testing.assert_close(canon.B, reference.B, atol=1e-5, rtol=0)
    # dW is rebuilt: the canonical factors hold the scale (scale 1) and the conv shapes
    assert reference.scale == 1.0 and reference.A.shape == module.A.shape
    assert reference.B.shape == module.B.shape
    assert relative(reference.delta(), module.delta()) < 1e-5


def test_scale_is_folded_and_float32_input_works():
    module = random_module(7, scale=27.0, rank=1, dtype=torch.float32)
    folded = ModuleLoRA(module.A, module.B * 27.0, 1.0)
    R = random_invertible(7, 1, dtype=torch.float32)
    a, b = canonical_factors(module).module, canonical_factors(transformed(folded, R, 0.5)).module
    assert a.A.dtype == torch.float32
    torch.testing.assert_close(a.A, b.A, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.B, b.B, atol=1e-5, rtol=0)
    assert relative(a.delta(), module.delta()) < 1e-6


def test_canonical_factors_are_balanced_svd_factors_with_the_sign_rule():
    module = random_module(3, out=10, inp=7, rank=4)
    canon = canonical_factors(module)
    a, b = canon.module.A, canon.module.B
    s = torch.linalg.svdvals(module.delta())[:4]  # plain reference: SVD of dW itself
    torch.testing.assert_close(canon.singular_values, s)
    # B' = U sqrt(S), A' = sqrt(S) V^T  =>  B'^T B' = A' A'^T = diag(S)
    torch.testing.assert_close(b.T @ b, torch.diag(s), atol=1e-10, rtol=0)
    torch.testing.assert_close(a @ a.T, torch.diag(s), atol=1e-10, rtol=0)
    # the largest-magnitude entry of each column of U (and of B') is positive
    rows = b.abs().argmax(dim=0)
    assert (b[rows, torch.arange(4)] > 0).all()


@pytest.mark.parametrize("kernel", [None, 3])
def test_truncate_keeps_the_top_pairs_and_reports_dropped_energy(kernel):
    module = random_module(11, out=16, inp=6, rank=5, kernel=kernel)
    delta = module.delta().reshape(16, -1)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # plain reference
    best = (u[:, :2] * s[:2]) @ vh[:2]
    canon = canonical_factors(module, rank=2)
    assert canon.module.rank == 2
    assert relative(canon.module.delta().reshape(16, -1), best) < 1e-10
    expected = float((s[2:] ** 2).sum() / (s**2).sum())
    assert canon.dropped_energy == pytest.approx(expected, rel=1e-10)
    # a larger rank pads with zero pairs: the same dW, nothing dropped
    padded = canonical_factors(module, rank=8)
    assert padded.module.rank == 8 and padded.dropped_energy == 0.0
    assert relative(padded.module.delta(), module.delta()) < 1e-10


def test_rank_above_the_matrix_size_and_zero_lora():
    wide = random_module(5, out=2, inp=9, rank=4)  # r > out: dW has rank 2
    canon = canonical_factors(wide).module
    assert canon.A.shape == (4, 9) and canon.B.shape == (2, 4)
    assert relative(canon.delta(), wide.delta()) < 1e-10
    assert (canon.B[:, 2:] == 0).all()
    zero = ModuleLoRA(torch.randn(3, 5), torch.zeros(4, 3), 2.0)
    result = canonical_factors(zero)
    assert (result.module.A == 0).all() and result.dropped_energy == 0.0


def lora(seed, scale=2.0):
    return LoRAWeights(
        {
            "b.conv": random_module(seed, out=6, inp=4, rank=2, kernel=3, scale=scale),
            "a.linear": random_module(seed + 1, out=5, inp=7, rank=2, scale=scale),
        }
    )


def test_flatten_spec_is_an_exact_inverse_and_survives_json():
    weights = lora(0)
    spec = FlatSpec.of(weights)
    assert spec.modules == ["a.linear", "b.conv"]
    assert [(e.module, e.factor, e.offset) for e in spec.entries] == [
        ("a.linear", "A", 0),
        ("a.linear", "B", 14),
        ("b.conv", "A", 24),
        ("b.conv", "B", 24 + 72),
    ]
    assert spec.size == 24 + 72 + 12
    vector = spec.flatten(weights, dtype=torch.float64)
    back = FlatSpec.from_json(spec.to_json()).unflatten(vector)
    for name, module in weights.modules.items():
        assert torch.equal(back.modules[name].A, module.A)
        assert torch.equal(back.modules[name].B, module.B * module.scale)  # scale folded
        assert back.modules[name].scale == 1.0
        torch.testing.assert_close(back.modules[name].delta(), module.delta())


def test_canonical_vectors_are_equal_for_equal_updates():
    weights = lora(1, scale=3.0)
    other = LoRAWeights(
        {
            n: transformed(ModuleLoRA(m.A, m.B * 1.5, m.scale / 1.5), random_invertible(2, 2), -2.0)
            for n, m in weights.modules.items()
        }
    )
    (a, _), (b, _) = canonicalize(weights), canonicalize(other)
    spec = FlatSpec.of(a)
    torch.testing.assert_close(spec.flatten(a), spec.flatten(b), atol=1e-5, rtol=0)


def test_flatten_rejects_misfits():
    weights = lora(2)
    spec = FlatSpec.of(weights)
    other = LoRAWeights({"a.linear": weights.modules["a.linear"]})
    with pytest.raises(DataError, match="does not fit"):
        spec.flatten(other)
    with pytest.raises(DataError, match="does not fit"):
        spec.unflatten(torch.zeros(spec.size + 1))
    with pytest.raises(DataError, match="malformed"):
        FlatSpec.from_json('{"version": 1, "entries": [["a", "A", [2, 3], 5]]}')


# ---------------------------------------------------------------- alignment to a reference


def _pairs_distance(module, reference):
    return float((pair_matrix(module) - reference).norm())


@pytest.mark.parametrize("kernel", [None, 3])
def test_align_factors_keeps_dw_and_finds_the_closest_rotation(kernel):
    module = canonical_factors(random_module(21, out=5, inp=4, rank=2, kernel=kernel)).module
    reference = torch.randn(pair_matrix(module).shape, generator=torch.Generator().manual_seed(3))
    aligned = align_factors(module, reference)
    assert aligned.A.shape == module.A.shape and aligned.B.shape == module.B.shape
    assert relative(aligned.delta(), module.delta()) < 1e-10
    # plain reference: every rotation and reflection of the plane on a fine grid of angles
    best = math.inf
    for theta in torch.linspace(0, 2 * math.pi, 3601, dtype=torch.float64):
        c, s = math.cos(theta), math.sin(theta)
        for r in ([[c, -s], [s, c]], [[c, s], [s, -c]]):
            rotated = rotate_pairs(module, torch.tensor(r, dtype=torch.float64))
            best = min(best, _pairs_distance(rotated, reference))
    assert _pairs_distance(aligned, reference) <= best + 1e-9
    assert _pairs_distance(aligned, reference) > best - 1e-3  # the grid is fine enough


def test_aligned_factors_are_the_same_for_the_same_dw_and_stay_balanced():
    module = random_module(4, out=8, inp=6, rank=3, scale=2.0)
    other = transformed(module, random_invertible(4, 3), -0.6)
    reference = torch.randn(14, 3, dtype=torch.float64)
    a = align_factors(canonical_factors(module).module, reference)
    b = align_factors(canonical_factors(other).module, reference)
    torch.testing.assert_close(a.A, b.A, atol=1e-8, rtol=0)
    torch.testing.assert_close(a.B, b.B, atol=1e-8, rtol=0)
    torch.testing.assert_close(a.B.T @ a.B, a.A @ a.A.T, atol=1e-10, rtol=0)  # balanced
    with pytest.raises(LoRAError, match="scale-1"):
        pair_matrix(module)
