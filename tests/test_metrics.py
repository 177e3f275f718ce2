"""Frechet distance, the digits classifier and the digits metrics."""

import time

import numpy as np
import pytest
import torch

from condlora.core.errors import DataError
from condlora.data import load_digits_images, stratified_split
from condlora.metrics import (
    DigitsClassifier,
    digits_metrics,
    frechet_of_features,
    gaussian_stats,
    load_classifier,
    save_classifier,
    train_digits_classifier,
)


def test_gaussian_stats_matches_numpy():
    x = np.random.default_rng(0).normal(size=(50, 4))
    mu, sigma = gaussian_stats(torch.from_numpy(x).float())
    assert mu.dtype == np.float64 and sigma.shape == (4, 4)
    assert np.allclose(mu, x.mean(0), atol=1e-6)
    assert np.allclose(sigma, np.cov(x.T, ddof=1), atol=1e-5)
    with pytest.raises(DataError):
        gaussian_stats(np.zeros((1, 4)))


def test_frechet_of_a_set_with_itself_is_zero():
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(500, 16)))
    assert abs(frechet_of_features(x, x)) < 1e-6


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(2)
    mu1, s1 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 2.0, 0.5])
    mu2, s2 = np.array([1.0, 0.5, -1.7]), np.array([1.5, 1.0, 0.5])
    a = mu1 + s1 * rng.normal(size=(200_000, 3))
    b = mu2 + s2 * rng.normal(size=(200_000, 3))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    got = frechet_of_features(torch.from_numpy(a), torch.from_numpy(b))
    assert abs(got - expected) / expected < 0.02


def test_frechet_survives_singular_covariances():
    x = np.random.default_rng(3).normal(size=(5, 20))  # rank 4 < 20
    y = np.random.default_rng(4).normal(size=(5, 20))
    fd = frechet_of_features(torch.from_numpy(x), torch.from_numpy(y))
    assert np.isfinite(fd) and fd > 0


@pytest.fixture(scope="module")
def digits_setup():
    images, labels = load_digits_images(16)
    (tx, ty), (hx, hy) = stratified_split(images, labels)
    start = time.perf_counter()
    model = train_digits_classifier(tx, ty)
    seconds = time.perf_counter() - start
    return model, seconds, (tx, ty), (hx, hy)


def test_classifier_held_out_accuracy(digits_setup):
    model, seconds, _, (hx, hy) = digits_setup
    assert not model.training
    with torch.no_grad():
        accuracy = (model(hx).argmax(1) == hy).float().mean().item()
    print(f"held-out accuracy {accuracy:.4f}, trained in {seconds:.1f} s")
    assert accuracy >= 0.95
    assert model.features(hx).shape == (297, 128)


def test_classifier_training_is_seeded():
    images, labels = load_digits_images(8)
    state = torch.random.get_rng_state()
    a = train_digits_classifier(images[:256], labels[:256], steps=5, seed=7, batch_size=32)
    b = train_digits_classifier(images[:256], labels[:256], steps=5, seed=7, batch_size=32)
    assert torch.equal(state, torch.random.get_rng_state())
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_save_load_round_trip(digits_setup, tmp_path):
    model, _, _, (hx, _) = digits_setup
    path = tmp_path / "classifier.safetensors"
    save_classifier(model, path)
    loaded = load_classifier(path)
    assert isinstance(loaded, DigitsClassifier) and loaded.resolution == 16
    with torch.no_grad():
        assert torch.equal(model(hx), loaded(hx))
    with pytest.raises(DataError):
        load_classifier(tmp_path / "missing.safetensors")


def test_classifier_rejects_wrong_resolution(digits_setup):
    model, *_ = digits_setup
    with pytest.raises(DataError):
        model(torch.zeros(2, 1, 32, 32))


def test_digits_metrics(digits_setup):
    model, _, (tx, ty), (hx, hy) = digits_setup
    real = digits_metrics(model, hx, hy, tx)
    assert real["class_accuracy"] >= 0.95
    unlabelled = digits_metrics(model, hx, None, tx)
    assert unlabelled["class_accuracy"] is None
    assert unlabelled["frechet_distance"] == pytest.approx(real["frechet_distance"])
    noise = digits_metrics(model, torch.rand(297, 1, 16, 16) * 2 - 1, hy, tx)
    blurred = digits_metrics(model, torch.nn.functional.avg_pool2d(hx, 3, 1, 1), hy, tx)
    print(
        f"FD real {real['frechet_distance']:.3f}, blurred {blurred['frechet_distance']:.3f}, "
        f"noise {noise['frechet_distance']:.3f}"
    )
    assert real["frechet_distance"] < blurred["frechet_distance"] < noise["frechet_distance"]
    weights = torch.nn.functional.one_hot(hy, 10).float()
    assert digits_metrics(model, hx, weights, tx)["class_accuracy"] == real["class_accuracy"]
