"""`condlora eval`: metrics.json of a tiny run, cached reference statistics, KID, the floor."""

import json
import shutil

import numpy as np
import pytest
import torch
from scipy import linalg

import condlora.evaluation.evaluate as evaluate
import condlora.metrics.reference as reference
from condlora.cli import main
from condlora.data import load_digits_images
from condlora.image.build import build_data
from condlora.image.config import load_config
from condlora.image.generate import generate, labels_for
from condlora.image.task import load_run, train
from condlora.metrics import load_classifier, save_classifier, train_digits_classifier
from condlora.metrics.reference import floor_at_sizes, kid_from_features

from .conftest import CONFIGS, TINY

FIELDS = {
    "fd", "kid_mean", "kid_std", "class_accuracy", "num_samples", "num_real", "sampler",
    "steps", "seed", "step", "feature", "fd_floor", "fd_floor_sizes", "fd_floor_at_eval_sizes",
    "kid_floor_mean", "warnings",
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def few_floor_splits():
    """Two halvings for the FD floor instead of 20 (each FD takes a 128 x 128 sqrtm)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference, "FLOOR_SPLITS", 2)
        yield


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    """A class-conditional TimeLoRA + ClassLoRA run of 8 tiny steps, with a quick classifier."""
    run = tmp_path_factory.mktemp("eval") / "run"
    cfg = load_config(CONFIGS / "digits-classlora.yaml", TINY)
    train(cfg, run, max_steps=8, progress=False)
    (images, labels), _ = build_data(cfg)
    classifier = train_digits_classifier(images, labels, steps=15)
    save_classifier(classifier, run / evaluate.CLASSIFIER_FILE)
    return run


def plain_fd(a: np.ndarray, b: np.ndarray) -> float:
    """FD written out: |mu_a - mu_b|^2 + Tr(Sa + Sb - 2 sqrtm(Sa Sb))."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(sa @ sb))
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean))


def test_eval_cli_writes_metrics_json(tiny_run, capsys):
    assert main(["eval", "--run", str(tiny_run), "--num", "40", "--seed", "3", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "FD" in out and "KID" in out and "real-to-real" in out
    assert "below 2000" in err  # small --num is allowed, with a warning
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert FIELDS <= set(m)
    assert (m["num_samples"], m["num_real"], m["step"], m["seed"]) == (40, 1797, 8, 3)
    assert (m["sampler"], m["steps"], m["feature"]) == ("heun", 3, "digits")
    assert m["fd_floor_sizes"] == [898, 899] and m["kid_subset_size"] == 40

    # The same numbers, recomputed plainly from the same samples and all 1,797 real digits.
    cfg, denoiser, _ = load_run(tiny_run)
    labels = labels_for(cfg, 40)
    samples = generate(denoiser, cfg, 40, labels, seed=3)
    classifier = load_classifier(tiny_run / evaluate.CLASSIFIER_FILE)
    real, _ = load_digits_images(16)
    with torch.no_grad():
        fake_f = classifier.features(samples.clamp(-1, 1)).double().numpy()
        real_f = classifier.features(real).double().numpy()
        predicted = classifier(samples.clamp(-1, 1)).argmax(1)
    assert m["fd"] == pytest.approx(plain_fd(fake_f, real_f), rel=1e-4)
    assert m["class_accuracy"] == pytest.approx((predicted == labels).double().mean().item())
    assert m["fd_ratio"] == pytest.approx(m["fd"] / m["fd_floor_at_eval_sizes"])


def test_second_evaluation_reads_the_cached_reference(tiny_run, monkeypatch):
    calls = []
    extract = evaluate.extract_features

    def counting(feature, images, batch_size=250):
        calls.append(len(images))
        return extract(feature, images, batch_size)

    monkeypatch.setattr(evaluate, "extract_features", counting)
    cache = tiny_run.parent / "cache"
    cache.mkdir()
    shutil.copy(tiny_run / evaluate.CLASSIFIER_FILE, cache)  # the classifier is cached too
    cfg = load_run(tiny_run)[0]
    first = evaluate.make_judge(cfg, "digits", cache)
    assert calls == [1797]  # the real digits, once
    assert len(list(cache.glob("reference-digits-digits-16px.safetensors"))) == 1
    second = evaluate.make_judge(cfg, "digits", cache)
    assert calls == [1797]  # read back, nothing extracted
    np.testing.assert_array_equal(first.reference.sigma, second.reference.sigma)
    assert torch.equal(first.reference.kid_features, second.reference.kid_features)

    metrics = evaluate.evaluate_run(tiny_run, num=20, cache_dir=cache)
    assert calls == [1797, 20]  # only the samples
    assert metrics["fd_floor"] == first.reference.floor["fd_floor"]

    # Another feature network (different weights) makes the cached file stale.
    monkeypatch.setattr(evaluate, "fingerprint", lambda module: "other-weights")
    evaluate.make_judge(cfg, "digits", cache)
    assert calls == [1797, 20, 1797]


@pytest.mark.slow
def test_real_digits_score_zero_fd_against_their_reference(tiny_run):
    cfg = load_run(tiny_run)[0]
    judge = evaluate.make_judge(cfg, "digits", tiny_run)
    real = evaluate.real_images(cfg)
    assert len(real) == 1797
    scores = evaluate.score(judge, real, None)
    assert abs(scores["fd"]) < 1e-8 * np.trace(judge.reference.sigma)
    assert scores["class_accuracy"] is None  # no requested labels


def test_classifier_is_trained_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "CLASSIFIER_STEPS", 3)
    cfg = load_config(CONFIGS / "digits-baseline.yaml", TINY)
    first = evaluate.digits_classifier(cfg, tmp_path)
    assert (tmp_path / evaluate.CLASSIFIER_FILE).is_file()
    monkeypatch.setattr(evaluate, "train_digits_classifier", None)  # must not train again
    second = evaluate.digits_classifier(cfg, tmp_path)
    assert evaluate.fingerprint(first) == evaluate.fingerprint(second)


def test_kid_matches_the_written_out_formula():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 5, generator=gen), torch.randn(30, 5, generator=gen) + 0.5
    mean, std, size = kid_from_features(x, y, subsets=1)  # one subset of all 30: no sampling
    assert size == 30

    def k(a, b):
        return (a @ b.T / 5 + 1) ** 3

    m = 30
    kxx, kyy, kxy = k(x, x).double(), k(y, y).double(), k(x, y).double()
    expected = (
        (kxx.sum() - kxx.diag().sum()) / (m * (m - 1))
        + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
        - 2 * kxy.mean()
    )
    assert mean == pytest.approx(expected.item(), rel=1e-5)
    assert std == 0.0
    scaled, _, _ = kid_from_features(x * 10, y * 10, subsets=1, gamma=1 / 500)
    assert scaled == pytest.approx(mean, rel=1e-5)  # gamma * (10x).(10y) = x.y / 5


def test_floor_rescales_like_one_over_n():
    floor = {"fd_floor": 10.0, "fd_floor_sizes": [100, 100]}
    assert floor_at_sizes(floor, 100, 100) == pytest.approx(10.0)
    assert floor_at_sizes(floor, 200, 200) == pytest.approx(5.0)
    assert floor_at_sizes(floor, 100, 10**9) == pytest.approx(5.0, rel=1e-6)


def test_inception_without_weights_is_one_clear_line(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    missing = tmp_path / "pt_inception.pth"
    assert main(["eval", "--run", str(run), "--num", "4", "--feature", "inception"]) == 2
    args = ["--inception-weights", str(missing)]
    assert main(["eval", "--run", str(run), "--num", "4", "--feature", "inception", *args]) == 2
    assert main(["eval", "--run", str(run), "--num", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    assert "--inception-weights" in lines[0] and "pt_inception-2015-12-05" in lines[0]
    assert "not found" in lines[1] and str(missing) in lines[1]
    assert "at least 2" in lines[2]
