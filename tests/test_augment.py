"""Tests for the EDM augmentation pipeline and its augment labels."""

import math

import pytest
import torch

from condlora.core.errors import ConfigError, DataError
from condlora.data import AUGMENT_DIM, AugmentPipe
from condlora.data.augment import affine_warp, rotation, scaling, translation

pytestmark = pytest.mark.usefixtures("one_thread")

NONE = dict(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)


def only(**kwargs):
    """A pipe with p = 1 and only the given multipliers switched on."""
    return AugmentPipe(p=1.0, **{**NONE, **kwargs})


def images(n=64, c=3, h=8, w=8, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_defaults_are_edm_cifar10():
    probs = AugmentPipe().probabilities()
    torch.testing.assert_close(probs, torch.tensor([1.0, 0.12, 0.12, 0.12, 0.12, 0.12]))
    assert AUGMENT_DIM == 9


def test_p0_is_identity_with_zero_labels():
    x = images()
    out, labels = AugmentPipe(p=0.0)(x, gen())
    assert torch.equal(out, x)
    assert labels.shape == (64, AUGMENT_DIM) and labels.dtype == torch.float32
    assert (labels == 0).all()


@pytest.mark.parametrize("axis", ["xflip", "yflip"])
def test_flips_are_exact_pixel_flips(axis):
    x = images()
    out, labels = only(**{axis: 1})(x, gen(1))
    col, dim = (0, 3) if axis == "xflip" else (1, 2)
    flipped = labels[:, col] == 1
    assert 10 < flipped.sum() < 54  # a coin per image
    assert torch.equal(out[flipped], x[flipped].flip(dim))
    assert torch.equal(out[~flipped], x[~flipped])
    others = [i for i in range(AUGMENT_DIM) if i != col]
    assert set(labels[:, col].tolist()) <= {0.0, 1.0} and (labels[:, others] == 0).all()


def test_quarter_turn_equals_rot90():
    x = images(4)
    for angle, k in [(math.pi / 2, -1), (-math.pi / 2, 1), (math.pi, 2)]:
        out = affine_warp(x, rotation(torch.full((4,), angle)))
        torch.testing.assert_close(out, torch.rot90(x, k, dims=(2, 3)), atol=1e-5, rtol=0)


def test_integer_translation_equals_roll_in_the_interior():
    x = images(4, h=10, w=12)
    out = affine_warp(x, translation(torch.full((4,), 2.0), torch.full((4,), -1.0)))
    rolled = torch.roll(x, shifts=(-1, 2), dims=(2, 3))  # content moves right 2, up 1
    torch.testing.assert_close(out[..., :-1, 2:], rolled[..., :-1, 2:], atol=1e-5, rtol=0)


def test_rotation_labels_describe_the_rotation():
    x = images()
    out, labels = only(rotate_frac=1)(x, gen(2))
    w = torch.atan2(labels[:, 4], labels[:, 3] + 1)  # EDM's angle: its map undoes R(w)
    assert w.abs().max() <= math.pi and w.std() > 1  # uniform over (-pi, pi)
    torch.testing.assert_close(out, affine_warp(x, rotation(-w)), atol=1e-5, rtol=0)
    assert (labels[:, [0, 1, 2, 5, 6, 7, 8]] == 0).all()


def test_labels_describe_the_whole_transform():
    # everything but the anisotropy (whose label leaves the stretch direction's sign open,
    # as EDM's does) and check that the labels rebuild the map exactly
    x = images(h=8, w=12)
    pipe = AugmentPipe(p=1.0, aniso=0)
    out, lab = pipe(x, gen(3))
    assert (lab[:, 2:5] != 0).all() and (lab[:, 7:] != 0).all() and (lab[:, 5:7] == 0).all()
    flipped = torch.where(lab[:, 0, None, None, None] == 1, x.flip(3), x)
    flipped = torch.where(lab[:, 1, None, None, None] == 1, flipped.flip(2), flipped)
    iso = 2 ** (0.2 * lab[:, 2])
    w = torch.atan2(lab[:, 4], lab[:, 3] + 1)
    shift = translation(lab[:, 7] * 12 * 0.125, lab[:, 8] * 8 * 0.125)
    ref = affine_warp(flipped, shift @ rotation(-w) @ scaling(iso, iso))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # anisotropy along the x axis (no random axis): label (a, 0), stretch 2^(0.2 a) along x
    out, lab = AugmentPipe(p=1.0, **{**NONE, "aniso": 1}, aniso_rotate_prob=0.0)(x, gen(4))
    assert (lab[:, 6] == 0).all() and (lab[:, 5] != 0).all()
    s = 2 ** (0.2 * lab[:, 5])
    torch.testing.assert_close(out, affine_warp(x, scaling(s, 1 / s)), atol=1e-5, rtol=0)


def edm_rotate2d(theta):
    """EDM's rotate2d, written out: [[cos, sin(-theta)], [sin, cos]] in homogeneous form."""
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def edm_scale2d(sx, sy):
    return torch.tensor([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def edm_translate2d(tx, ty):
    return torch.tensor([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]], dtype=torch.float64)


def test_labels_of_a_fixed_transform_are_edms():
    # EDM's AugmentPipe, for draws s (scale), w (rotation), a, r (anisotropy), t (translation),
    # builds G_inv = scale2d_inv(2^(0.2 s)) @ rotate2d_inv(-w) @ rotate2d_inv(r)
    #               @ scale2d_inv(2^(0.2 a), 2^(-0.2 a)) @ rotate2d_inv(-r) @ translate2d_inv(t)
    # and appends the labels s, cos w - 1, sin w, a cos r, a sin r, t_x, t_y.
    s, w, a, r, tx, ty = 0.3, 0.7, -0.4, 1.1, 0.2, -0.5
    size = (12 * 0.125, 8 * 0.125)  # translate_frac_std times W and H
    G, labels = AugmentPipe().geometry(torch.tensor([[s, w, a, r, tx, ty]]), torch.tensor(size))
    edm_labels = [s, math.cos(w) - 1, math.sin(w), a * math.cos(r), a * math.sin(r), tx, ty]
    torch.testing.assert_close(labels[0].double(), torch.tensor(edm_labels, dtype=torch.float64))
    iso, ani = 2 ** (0.2 * s), 2 ** (0.2 * a)
    g_inv = (
        edm_scale2d(1 / iso, 1 / iso)
        @ edm_rotate2d(w)  # rotate2d_inv(-w) = rotate2d(w)
        @ edm_rotate2d(-r)  # rotate2d_inv(r)
        @ edm_scale2d(1 / ani, ani)
        @ edm_rotate2d(r)  # rotate2d_inv(-r)
        @ edm_translate2d(-tx * size[0], -ty * size[1])
    )
    torch.testing.assert_close(torch.linalg.inv(G[0].double()), g_inv, atol=1e-6, rtol=0)
    # and the pipe applies that map: rotation only, label sin w > 0 <=> EDM's angle w > 0
    x = images(8)
    out, lab = only(rotate_frac=1)(x, gen(8))
    for i in range(8):
        w_i = math.atan2(lab[i, 4].item(), lab[i, 3].item() + 1)
        content_map = torch.linalg.inv(edm_rotate2d(w_i)).float()[None]
        torch.testing.assert_close(out[i : i + 1], affine_warp(x[i : i + 1], content_map))


def test_label_rates_match_the_configured_probabilities():
    x = images(4000, c=1, h=4, w=4)
    out, lab = AugmentPipe()(x, gen(5))
    nz = lab != 0
    rates = {
        "xflip": nz[:, 0],  # applied always, a coin: 1/2
        "yflip": nz[:, 1],  # 0.12 * 1/2
        "scale": nz[:, 2],
        "rotate": nz[:, 3:5].any(1),
        "aniso": nz[:, 5:7].any(1),
        "aniso axis turned": nz[:, 6],  # 0.12 * 1/2
        "translate": nz[:, 7:].any(1),
    }
    want = {"xflip": 0.5, "yflip": 0.06, "aniso axis turned": 0.06}
    for name, hit in rates.items():
        p = want.get(name, 0.12)
        four_sigma = 4 * (p * (1 - p) / len(x)) ** 0.5  # binomial spread of the rate
        assert hit.float().mean().item() == pytest.approx(p, abs=four_sigma), name
    # pairs switch on together; untouched images are returned exactly
    assert torch.equal(nz[:, 3], nz[:, 4]) and torch.equal(nz[:, 7], nz[:, 8])
    untouched = ~nz.any(1)
    assert untouched.sum() > 1000 and torch.equal(out[untouched], x[untouched])


def test_seeded():
    x = images()
    a, la = AugmentPipe(p=0.5)(x, gen(6))
    b, lb = AugmentPipe(p=0.5)(x, gen(6))
    c, lc = AugmentPipe(p=0.5)(x, gen(7))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(la, lc)


def test_errors():
    with pytest.raises(ConfigError, match="augment.p must be >= 0"):
        AugmentPipe(p=-0.1)
    with pytest.raises(ConfigError, match="scale_std"):
        AugmentPipe(scale_std=float("nan"))
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        AugmentPipe()(torch.zeros(3, 8, 8))
