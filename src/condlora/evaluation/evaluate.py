"""`condlora eval`: sample a finished run (EMA weights) and score the samples against real data.

Scores, all on the features of one feature network ("digits": the penultimate layer of a
small CNN trained on the real digits; "inception": the FID Inception-v3):

- fd: Frechet distance between Gaussians fitted to sample and real features (FID when the
  network is Inception);
- kid_mean / kid_std: Kernel Inception Distance (torchmetrics) over random subsets;
- class_accuracy: fraction of samples that the digits classifier reads as the requested class;
- the real-to-real floor: FD and KID between disjoint random halves of the real images. FD is
  biased upwards on small sets, so a distance means little without it.

Real images: all 1,797 digits (training and held-out) for the embedded digits, the training
split otherwise. Their statistics are cached beside the classifier (`cache_dir`), keyed by
data set, feature network and resolution, so a second evaluation extracts only sample features.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from condlora.core.errors import CondloraError, DataError
from condlora.core.files import check_output_file, check_output_folder, write_text_atomic
from condlora.image.build import build_data
from condlora.image.checks import check_sample_count, check_seed, sampling_config
from condlora.image.config import Config
from condlora.image.generate import generate, labels_for
from condlora.image.task import load_run
from condlora.metrics import (
    DigitsClassifier,
    class_accuracy,
    classifier_outputs,
    frechet_to_stats,
    load_classifier,
    load_fid_inception,
    save_classifier,
    train_digits_classifier,
)
from condlora.metrics.inception import WEIGHTS_HINT
from condlora.metrics.reference import (
    DEFAULT_SUBSETS,
    Reference,
    floor_at_sizes,
    kid_from_features,
    load_reference,
    reference_from_features,
    save_reference,
)

FEATURES = ("digits", "inception")
DIGITS_MIN_SAMPLES = 2000  # fewer samples make FD on digits too noisy to compare runs
OTHER_DEFAULT_NUM = 10_000  # default --num for data sets other than the digits
CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_STEPS = 600  # training steps of the digits classifier (seed 0: deterministic)
METRICS_FILE = "metrics.json"


@dataclass
class FeatureNet:
    """A feature network: [-1, 1] images -> (N, D) features."""

    name: str  # "digits" | "inception"
    fn: Callable[[torch.Tensor], torch.Tensor]  # (N, channels, H, W) in [-1, 1] -> (N, D)
    channels: int  # input channels the network takes (1-channel images are repeated to 3)
    fingerprint: str  # hash of its weights: cached statistics must come from the same weights
    description: str  # what the distance is, for the report
    scale_kid: bool  # KID gamma from the real features' scale (digits) instead of 1 / D


@dataclass
class Judge:
    """Everything that scores samples of one data set."""

    feature: FeatureNet
    reference: Reference  # real-feature statistics (cached)
    classifier: DigitsClassifier | None  # class accuracy (digits data only)


def fingerprint(module: nn.Module) -> str:
    """A short SHA-256 of a module's state dict (names, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def extract_features(
    feature: FeatureNet, images: torch.Tensor, batch_size: int = 250
) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] -> (N, D) float64 features of `feature`."""
    out = []
    for chunk in images.split(batch_size):
        x = chunk.float().clamp(-1.0, 1.0)
        if x.shape[1] == 1 and feature.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        out.append(feature.fn(x).reshape(len(x), -1).double().cpu())
    return torch.cat(out)


def real_images(cfg: Config) -> torch.Tensor:
    """The real images that samples are compared with: all digits, else the training split."""
    (train_x, _), (hold_x, _) = build_data(cfg)
    return torch.cat([train_x, hold_x]) if cfg.data.name == "digits" else train_x


def digits_classifier(
    cfg: Config, cache_dir: str | Path, progress: bool | dict = False
) -> DigitsClassifier:
    """The digits classifier cached in `cache_dir`, trained (seeded) on the training split."""
    path = Path(cache_dir) / CLASSIFIER_FILE
    if path.exists():
        try:
            model = load_classifier(path)
        except DataError as err:  # a damaged cache: it is rebuilt below
            print(f"condlora: warning: {err}; retraining it", file=sys.stderr)
            model = None
        if model is not None and model.resolution == cfg.data.resolution:
            return model
    (images, labels), _ = build_data(cfg)
    print(f"training the digits classifier ({CLASSIFIER_STEPS} steps), cached in {path}")
    model = train_digits_classifier(images, labels, steps=CLASSIFIER_STEPS, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(model, path)
    return model


def reference_for(cfg: Config, feature: FeatureNet, cache_dir: str | Path) -> Reference:
    """Real-feature statistics: read from the cache if its key matches, else computed and saved."""
    d = cfg.data
    key = {
        "data": d.name,
        "path": str(d.path or ""),
        "resolution": d.resolution,
        "channels": d.channels,
        "real": "all"
        if d.name == "digits"
        else f"train (holdout {d.holdout}, seed {d.split_seed})",
        "feature": feature.name,
        "fingerprint": feature.fingerprint,
        "kid_gamma": "1/E|x|^2" if feature.scale_kid else "1/D",
    }
    path = Path(cache_dir) / f"reference-{d.name}-{feature.name}-{d.resolution}px.safetensors"
    if path.exists():
        try:
            ref = load_reference(path)
        except DataError:  # unreadable or not a reference file: recompute it
            ref = None
        if ref is not None and ref.key == key:
            return ref
    features = extract_features(feature, real_images(cfg))
    ref = reference_from_features(features, key, scale_kid=feature.scale_kid)
    save_reference(path, ref)
    return ref


def make_judge(
    cfg: Config,
    feature: str = "digits",
    cache_dir: str | Path = ".",
    inception_weights: str | Path | None = None,
) -> Judge:
    """Feature network, cached real statistics and (digits) classifier for a run's data."""
    if feature not in FEATURES:
        raise CondloraError(f"unknown feature '{feature}'; valid: {', '.join(FEATURES)}")
    data = cfg.data
    is_digits = data.name == "digits"
    classifier = digits_classifier(cfg, cache_dir) if is_digits else None
    if feature == "digits":
        if classifier is None:
            raise CondloraError(
                f"--feature digits judges the embedded digits only, not data.name {data.name}: "
                "use --feature inception --inception-weights PATH"
            )
        description = "FD on digits-CNN features; KID gamma = 1 / E|x|^2 of the real features"
        net = FeatureNet(
            "digits", classifier.features, 1, fingerprint(classifier), description, True
        )
    else:
        if inception_weights is None:
            raise CondloraError(f"--feature inception needs its weights: {WEIGHTS_HINT}")
        model = load_fid_inception(inception_weights)
        description = "FID (Inception-v3 pool3); KID gamma = 1 / 2048"
        net = FeatureNet("inception", model, 3, fingerprint(model), description, False)
    return Judge(net, reference_for(cfg, net, cache_dir), classifier)


def score(judge: Judge, samples: torch.Tensor, labels: torch.Tensor | None, seed: int = 0) -> dict:
    """FD, KID, class accuracy and the floor of `samples` (labels: the requested classes)."""
    if not torch.isfinite(samples).all():
        raise DataError(
            "the samples hold NaN or inf values (diverged weights or sampling): no scores"
        )
    features = extract_features(judge.feature, samples)
    ref = judge.reference
    fd = frechet_to_stats(features, ref.mu, ref.sigma, ref.num_real)
    kid_mean, kid_std, subset = kid_from_features(
        ref.kid_features, features, seed=seed, gamma=ref.kid_gamma
    )
    accuracy = None
    if judge.classifier is not None and labels is not None:
        _, logits = classifier_outputs(judge.classifier, samples)
        accuracy = class_accuracy(logits, labels)
    floor = floor_at_sizes(ref.floor, len(samples), ref.num_real)
    out = {"fd": fd, "kid_mean": kid_mean, "kid_std": kid_std}
    if judge.feature.name == "inception":
        out["fid"] = fd
    return out | {
        "kid_subset_size": subset,
        "kid_subsets": DEFAULT_SUBSETS,
        "class_accuracy": accuracy,
        "num_samples": len(samples),
        "num_real": ref.num_real,
        **ref.floor,
        "fd_floor_at_eval_sizes": floor,
        "fd_ratio": fd / floor,
    }


def default_num(cfg: Config) -> int:
    """Default sample count: 2,000 for the digits, 10,000 otherwise."""
    return DIGITS_MIN_SAMPLES if cfg.data.name == "digits" else OTHER_DEFAULT_NUM


def evaluate_run(
    run_dir: str | Path,
    num: int | None = None,
    feature: str = "digits",
    inception_weights: str | Path | None = None,
    seed: int = 0,
    steps: int | None = None,
    sampler: str | None = None,
    guidance: float | None = None,
    cache_dir: str | Path | None = None,
    judge: Judge | None = None,
    progress: bool = False,
) -> dict:
    """Sample `num` images from a run's EMA weights, score them, write `metrics.json`; return it.

    cache_dir holds the classifier and the real statistics (default: the run folder); a
    ready `judge` skips that step (an experiment shares one between its runs).
    """
    run_dir = Path(run_dir)
    check_seed(seed)
    cfg, denoiser, step = load_run(run_dir)
    cfg = sampling_config(cfg, steps, sampler, guidance)
    num = default_num(cfg) if num is None else num
    check_sample_count(cfg, num, least=2)
    check_output_file(run_dir / METRICS_FILE, "metrics file")
    if cache_dir is not None:
        check_output_folder(cache_dir, "--cache")
    notes = []
    if cfg.data.name == "digits" and num < DIGITS_MIN_SAMPLES:
        notes.append(
            f"--num {num} is below {DIGITS_MIN_SAMPLES}: FD on few samples is noisy and biased "
            "upwards; compare runs only at equal --num"
        )
    start = time.time()
    judge = judge or make_judge(cfg, feature, cache_dir or run_dir, inception_weights)
    labels = labels_for(cfg, num)
    sample_start = time.time()
    samples = generate(
        denoiser, cfg, num, labels, steps=steps, sampler=sampler, seed=seed, progress=progress
    )
    sample_seconds = time.time() - sample_start
    metrics = {
        "run": str(run_dir),
        "step": step,
        "data": cfg.data.name,
        "resolution": cfg.data.resolution,
        "feature": judge.feature.name,
        "metric": judge.feature.description,
        **score(judge, samples, labels, seed=seed),
        "sampler": sampler or cfg.diffusion.sampler,
        "steps": steps or cfg.diffusion.sample_steps,
        "seed": seed,
        "guidance": cfg.diffusion.guidance,
        "sample_seconds": round(sample_seconds, 2),
        "eval_seconds": round(time.time() - start, 2),
        "warnings": notes,
    }
    write_text_atomic(run_dir / METRICS_FILE, json.dumps(metrics, indent=2) + "\n", sync=True)
    return metrics


def summary_line(m: dict) -> str:
    """One line: step, FD against its floor, KID, class accuracy, set sizes."""
    acc = "" if m["class_accuracy"] is None else f", class accuracy {m['class_accuracy']:.1%}"
    h1, h2 = m["fd_floor_sizes"]
    return (
        f"step {m['step']}: FD {m['fd']:.3f} ({m['feature']} features; real-to-real "
        f"{m['fd_floor']:.3f} at {h1} vs {h2}, ~{m['fd_floor_at_eval_sizes']:.3f} scaled to "
        f"{m['num_samples']} vs {m['num_real']}), KID {m['kid_mean']:.5f} +- {m['kid_std']:.5f}"
        f"{acc}"
    )
