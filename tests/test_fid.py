"""FID Inception network, its weight loading, and torchmetrics-based Frechet distances."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy import linalg
from torch import nn

from condlora.core.errors import DataError
from condlora.metrics import (
    DigitsClassifier,
    FIDInception,
    frechet_of_features,
    frechet_to_stats,
    gaussian_stats,
    load_fid_inception,
)

# Parameters (conv weights, BN weight+bias, fc 2048->1008) of the FID Inception-v3.
FID_INCEPTION_PARAMS = 23_850_960


def _conv(name: str, cin: int, cout: int, kh: int, kw: int | None = None) -> dict:
    kw = kh if kw is None else kw
    return {
        f"{name}.conv.weight": (cout, cin, kh, kw),
        **{f"{name}.bn.{k}": (cout,) for k in ("weight", "bias", "running_mean", "running_var")},
        f"{name}.bn.num_batches_tracked": (),
    }


def reference_shapes() -> dict[str, tuple]:
    """Key -> shape of the pt_inception-2015-12-05 state dict, from the architecture tables."""
    ref: dict[str, tuple] = {}
    for name, cin, cout, k in [("1a", 3, 32, 3), ("2a", 32, 32, 3), ("2b", 32, 64, 3)]:
        ref |= _conv(f"Conv2d_{name}_3x3", cin, cout, k)
    ref |= _conv("Conv2d_3b_1x1", 64, 80, 1) | _conv("Conv2d_4a_3x3", 80, 192, 3)
    for blk, cin, pf in [("5b", 192, 32), ("5c", 256, 64), ("5d", 288, 64)]:
        p = f"Mixed_{blk}."
        for n, i, o, k in [("branch1x1", cin, 64, 1), ("branch5x5_1", cin, 48, 1),
                           ("branch5x5_2", 48, 64, 5), ("branch3x3dbl_1", cin, 64, 1),
                           ("branch3x3dbl_2", 64, 96, 3), ("branch3x3dbl_3", 96, 96, 3),
                           ("branch_pool", cin, pf, 1)]:  # fmt: skip
            ref |= _conv(p + n, i, o, k)
    for n, i, o, k in [("branch3x3", 288, 384, 3), ("branch3x3dbl_1", 288, 64, 1),
                       ("branch3x3dbl_2", 64, 96, 3), ("branch3x3dbl_3", 96, 96, 3)]:  # fmt: skip
        ref |= _conv("Mixed_6a." + n, i, o, k)
    for blk, c7 in [("6b", 128), ("6c", 160), ("6d", 160), ("6e", 192)]:
        p = f"Mixed_{blk}."
        ref |= _conv(p + "branch1x1", 768, 192, 1) | _conv(p + "branch_pool", 768, 192, 1)
        ref |= _conv(p + "branch7x7_1", 768, c7, 1) | _conv(p + "branch7x7_2", c7, c7, 1, 7)
        ref |= _conv(p + "branch7x7_3", c7, 192, 7, 1) | _conv(p + "branch7x7dbl_1", 768, c7, 1)
        for j, (kh, kw) in enumerate([(7, 1), (1, 7), (7, 1), (1, 7)], start=2):
            ref |= _conv(f"{p}branch7x7dbl_{j}", c7, 192 if j == 5 else c7, kh, kw)
    p = "Mixed_7a."
    ref |= _conv(p + "branch3x3_1", 768, 192, 1) | _conv(p + "branch3x3_2", 192, 320, 3)
    ref |= _conv(p + "branch7x7x3_1", 768, 192, 1) | _conv(p + "branch7x7x3_2", 192, 192, 1, 7)
    ref |= _conv(p + "branch7x7x3_3", 192, 192, 7, 1) | _conv(p + "branch7x7x3_4", 192, 192, 3)
    for blk, cin in [("7b", 1280), ("7c", 2048)]:
        p = f"Mixed_{blk}."
        ref |= _conv(p + "branch1x1", cin, 320, 1) | _conv(p + "branch_pool", cin, 192, 1)
        ref |= _conv(p + "branch3x3_1", cin, 384, 1) | _conv(p + "branch3x3dbl_1", cin, 448, 1)
        ref |= _conv(p + "branch3x3dbl_2", 448, 384, 3)
        for n in ("branch3x3_2", "branch3x3dbl_3"):
            ref |= _conv(f"{p}{n}a", 384, 384, 1, 3) | _conv(f"{p}{n}b", 384, 384, 3, 1)
    return ref | {"fc.weight": (1008, 2048), "fc.bias": (1008,)}


@pytest.fixture(scope="module")
def inception() -> FIDInception:
    """Random weights scaled so activations stay O(1) through the network."""
    torch.manual_seed(0)
    with torch.device("meta"):  # skip the default init (slow on CPU), set every tensor below
        model = FIDInception()
    model.to_empty(device="cpu")
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.8, 1.2)
            m.bias.uniform_(-0.1, 0.1)
            m.num_batches_tracked.zero_()
    return model


@pytest.fixture(scope="module")
def small_images() -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def small_out(inception, small_images) -> torch.Tensor:
    """Features of the 32x32 batch (resized to 299x299 inside): one heavy forward, shared."""
    return inception(small_images)


def test_inception_state_dict_matches_reference(inception):
    shapes = {k: tuple(v.shape) for k, v in inception.state_dict().items()}
    assert shapes == reference_shapes()
    assert sum(p.numel() for p in inception.parameters()) == FID_INCEPTION_PARAMS
    assert not inception.training and not any(p.requires_grad for p in inception.parameters())
    inception.train()
    assert not inception.training


def test_inception_outputs_2048_features(inception, small_out):
    big = torch.rand(1, 3, 299, 299) * 2 - 1
    out = inception(big)
    assert out.shape == (1, 2048) and torch.isfinite(out).all() and out.abs().sum() > 0
    assert small_out.shape == (1, 2048) and torch.isfinite(small_out).all()
    assert small_out.abs().sum() > 0 and not torch.allclose(out, small_out)
    with pytest.raises(DataError, match="3, H, W"):
        inception(torch.zeros(1, 1, 32, 32))


def test_inception_save_load_roundtrip(tmp_path, inception, small_images, small_out):
    state = {k: v.contiguous() for k, v in inception.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = load_fid_inception(tmp_path / name)
        assert torch.equal(loaded(small_images), small_out), name


@pytest.mark.slow
def test_inception_load_errors(tmp_path, inception):
    with pytest.raises(DataError, match="not found at .*pt_inception-2015-12-05-6726825d.pth"):
        load_fid_inception(tmp_path / "nope.pth")
    state = dict(inception.state_dict())
    torch.save(state, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot read"):
        load_fid_inception(tmp_path / "cut.pth")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(DataError, match="cannot read"):
        load_fid_inception(tmp_path / "cut.safetensors")
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["fc.bias"] = torch.zeros(1000)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(DataError) as err:
        load_fid_inception(tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "missing (1): Mixed_6b.branch7x7_2.conv.weight" in msg
    assert "unexpected (1): extra.weight" in msg and "fc.bias (1000,) != (1008,)" in msg


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """The plain formula: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), scipy's sqrtm."""
    covmean = np.real(linalg.sqrtm(sigma1 @ sigma2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean))


def test_frechet_of_set_with_itself_is_zero():
    feats = torch.rand(64, 4, generator=torch.Generator().manual_seed(0)).double()
    assert abs(frechet_of_features(feats, feats)) < 1e-6
    assert frechet_of_features(feats, feats.clamp(0, 0.5)) > 1e-3


def test_frechet_gaussian_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.zeros(3), np.array([0.6, -0.4, 0.2])
    a = rng.normal(size=(3, 3)) * 0.1
    s1, s2 = a @ a.T + 0.01 * np.eye(3), np.diag([0.02, 0.03, 0.01])
    x1 = torch.from_numpy(rng.multivariate_normal(mu1, s1, size=50_000))
    x2 = torch.from_numpy(rng.multivariate_normal(mu2, s2, size=50_000))
    fd = frechet_of_features(x1, x2)
    assert fd == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=0.01)
    assert fd == pytest.approx(frechet_distance(*gaussian_stats(x1), *gaussian_stats(x2)), rel=1e-6)


def test_frechet_with_digits_classifier_features():
    clf = DigitsClassifier(resolution=16).eval()
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.rand(200, 1, 16, 16, generator=gen) * 2 - 1 for _ in range(2))
    with torch.no_grad():
        fa, fb = clf.features(a).double(), clf.features(b).double()
    ref = frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb))
    assert frechet_of_features(fa, fb) == pytest.approx(ref, rel=1e-3, abs=1e-5)


def test_frechet_of_features_and_of_cached_stats_match_the_plain_formula():
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(300, 6, generator=gen).double() * 2
    fake = torch.randn(250, 6, generator=gen).double() + 0.3
    expected = frechet_distance(*gaussian_stats(fake), *gaussian_stats(real))
    assert frechet_of_features(real, fake) == pytest.approx(expected, rel=1e-9)
    mu, sigma = gaussian_stats(real)  # what the reference cache keeps
    assert frechet_to_stats(fake, mu, sigma, len(real)) == pytest.approx(expected, rel=1e-9)
    assert abs(frechet_of_features(real, real)) < 1e-6
