"""Scoring a method on the held-out subjects, and the table of mean +- std over seeds.

For each held-out subject k, a method's LoRA goes into the base model and draws digits
(every class, `samples_per_class` each). Then:

    subject score   cos(embed(samples_k), embed(real held-out digits in subject k's style))
    normalised      (method - no LoRA) / (fine-tuned - no LoRA), on the subject-mean scores
    class accuracy  the digits judge reads the requested digit
    LoRA MSE        mean over coordinates of ((v - v_fine-tuned) / std)^2, std over the
                    training collection (coordinates with std 0 left out)
    s per LoRA      wall time of `generate` / M (fine-tuned: the zoo's seconds per subject)

Runs are kept in scores.json under "method/size/seed", so a rerun scores only what is new.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from condlora.apps.synthesis_demo.config import DemoConfig
from condlora.apps.synthesis_demo.encoder import SubjectEncoder
from condlora.apps.synthesis_demo.methods import DemoData, Method
from condlora.core.files import write_text_atomic
from condlora.core.reporting import mean_std
from condlora.diffusion import Denoiser, sample
from condlora.lora.formats import LoRAWeights
from condlora.metrics import DigitsClassifier, classifier_outputs
from condlora.synthesis.bank import bank_denoiser, load_subject, subjects

NUM_DIGITS = 10


def digit_labels(per_class: int) -> Tensor:
    """Labels of one subject's samples: 0..9, `per_class` times."""
    return torch.arange(NUM_DIGITS).repeat(per_class)


@torch.no_grad()
def sample_subjects(
    base: Denoiser,
    loras: list[LoRAWeights] | None,
    num_subjects: int,
    per_class: int,
    seed: int,
    steps: int,
    rank: int,
    group: int = 20,
    resolution: int = 16,
    progress: bool = False,
) -> Tensor:
    """(S, 10 * per_class, 1, R, R) digits in [-1, 1]: subject k with loras[k] (None: the base).

    Heun sampling (EDM) with `steps` steps; subjects in groups of `group`.
    """
    labels = digit_labels(per_class)
    n = len(labels)
    out = []
    firsts = range(0, num_subjects, group)
    for g, first in enumerate(tqdm(firsts, desc="sampling", leave=False, disable=not progress)):
        members = range(first, min(first + group, num_subjects))
        denoiser = base
        if loras is not None:
            targets = sorted(loras[first].modules)
            denoiser = bank_denoiser(base, len(members), rank, targets, scale=1.0).eval()
            for slot, k in enumerate(members):
                load_subject(denoiser, slot, loras[k])
        generator = torch.Generator().manual_seed(seed * 100_003 + g)
        ids = torch.arange(len(members)).repeat_interleave(n)
        shape = (len(ids), 1, resolution, resolution)
        y = labels.repeat(len(members))
        if loras is None:
            x = sample(denoiser, shape, "heun", steps, generator, class_labels=y)
        else:
            with subjects(denoiser, ids):
                x = sample(denoiser, shape, "heun", steps, generator, class_labels=y)
        out.append(x.clamp(-1, 1).reshape(len(members), n, 1, resolution, resolution))
    return torch.cat(out)


SCORES_FILE = "scores.json"
COLUMNS = ("subject_score", "class_accuracy", "mse")  # per-subject columns of a run


@dataclass(frozen=True)
class Scoring:
    """What every run is scored against."""

    base: Denoiser  # the frozen base model
    encoder: SubjectEncoder  # subject embeddings
    judge: DigitsClassifier  # digit classes
    targets: Tensor  # [M, E] embeddings of the held-out subjects' real (held-out) digits
    finetuned: Tensor  # [M, D] the held-out subjects' own zoo LoRAs
    std: Tensor  # [D] coordinate std of the whole training collection
    cfg: DemoConfig


def run_key(method: str, size: int, seed: int) -> str:
    """Key of one run in scores.json."""
    return f"{method}/{size}/{seed}"


def subject_scores(encoder: SubjectEncoder, samples: Tensor, targets: Tensor) -> Tensor:
    """[M] cosine of each subject's sample embedding with its target embedding."""
    return (encoder.embed_sets(samples) * targets).sum(dim=1)


def vector_mse(vectors: Tensor, reference: Tensor, std: Tensor) -> Tensor:
    """[M] mean squared difference in standardised canonical space (std-0 coordinates left out)."""
    keep = std > 0
    diff = (vectors[:, keep] - reference[:, keep]) / std[keep]
    return diff.double().square().mean(dim=1).float()


def class_accuracies(judge: DigitsClassifier, samples: Tensor) -> Tensor:
    """[M] fraction of each subject's samples that the judge reads as the requested digit."""
    m, n = samples.shape[:2]
    labels = digit_labels(n // 10)
    _, logits = classifier_outputs(judge, samples.reshape(m * n, *samples.shape[2:]))
    hits = logits.argmax(dim=1).reshape(m, n) == labels
    return hits.double().mean(dim=1).float()


def score_method(
    scoring: Scoring, method: Method, data: DemoData, seed: int, progress: bool = False
) -> tuple[dict, Tensor]:
    """(run record, samples [M, n, 1, R, R]) of one method, fitted on `data` with `seed`."""
    cfg = scoring.cfg
    start = time.perf_counter()
    generate = method.fit(data, seed)
    fitted = time.perf_counter()
    vectors = generate(data.queries).float()
    seconds = (time.perf_counter() - fitted) / len(data.queries)
    loras = [data.spec.unflatten(v) for v in vectors] if bool(vectors.any()) else None
    samples = sample_subjects(
        scoring.base,
        loras,
        len(vectors),
        cfg.samples_per_class,
        seed,
        cfg.sample_steps,
        cfg.rank,
        resolution=scoring.encoder.resolution,
        progress=progress,
    )
    record = {
        "subject_score": subject_scores(scoring.encoder, samples, scoring.targets).tolist(),
        "class_accuracy": class_accuracies(scoring.judge, samples).tolist(),
        "mse": vector_mse(vectors, scoring.finetuned, scoring.std).tolist(),
        "seconds_per_lora": method.seconds_per_lora if method.seconds_per_lora else seconds,
        "fit_seconds": method.train_seconds(data, seed) if method.train_seconds else fitted - start,
        "run_seconds": time.perf_counter() - start,
    }
    return record, samples


class ScoreStore:
    """scores.json: finished runs by key, written atomically after each run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.runs: dict[str, dict] = {}
        if self.path.is_file():
            self.runs = json.loads(self.path.read_text())["runs"]

    def __contains__(self, key: str) -> bool:
        return key in self.runs

    def put(self, key: str, record: dict) -> None:
        """Keep a run and rewrite the file."""
        self.runs[key] = record
        write_text_atomic(self.path, json.dumps({"runs": self.runs}, indent=1, sort_keys=True))

    def seed_means(self, method: str, size: int, seeds: tuple[int, ...], column: str) -> Tensor:
        """[seeds] subject-mean of a column for each seed."""
        columns = [self.runs[run_key(method, size, s)][column] for s in seeds]
        return torch.tensor([sum(values) / len(values) for values in columns])

    def seed_values(self, method: str, size: int, seeds: tuple[int, ...], key: str) -> Tensor:
        """[seeds] a per-run number (seconds) for each seed."""
        return torch.tensor([float(self.runs[run_key(method, size, s)][key]) for s in seeds])


def seed_mean_std(values: Tensor) -> tuple[float, float]:
    """Mean and sample std over seeds (std 0 for one seed)."""
    mean, std = mean_std(values.double().tolist())
    return float("nan") if mean is None else mean, std or 0.0


def normalised(store: ScoreStore, method: str, size: int, full: int, seeds: tuple) -> Tensor:
    """[seeds] (method - no LoRA) / (fine-tuned - no LoRA) of subject-mean scores, per seed."""
    score = store.seed_means(method, size, seeds, "subject_score")
    floor = store.seed_means("no LoRA", full, seeds, "subject_score")
    ceiling = store.seed_means("fine-tuned", full, seeds, "subject_score")
    gap = ceiling - floor
    return torch.where(gap.abs() > 1e-12, (score - floor) / gap, torch.full_like(gap, math.nan))


def summary_rows(store: ScoreStore, methods: list[Method], full: int, seeds: tuple) -> list[dict]:
    """One row per method: (mean, std) over seeds of every column of the table."""
    rows = []
    for m in methods:
        rows.append(
            {
                "method": m.name,
                "subject_score": seed_mean_std(
                    store.seed_means(m.name, full, seeds, "subject_score")
                ),
                "normalised": seed_mean_std(normalised(store, m.name, full, full, seeds)),
                "class_accuracy": seed_mean_std(
                    store.seed_means(m.name, full, seeds, "class_accuracy")
                ),
                "mse": seed_mean_std(store.seed_means(m.name, full, seeds, "mse")),
                "seconds_per_lora": seed_mean_std(
                    store.seed_values(m.name, full, seeds, "seconds_per_lora")
                ),
                "fit_seconds": seed_mean_std(store.seed_values(m.name, full, seeds, "fit_seconds")),
            }
        )
    return rows


def seed_subject_scores(store: ScoreStore, method: str, size: int, seeds: tuple) -> Tensor:
    """[seeds * M] the subject score of every (seed, scored subject), seed by seed."""
    runs = [store.runs[run_key(method, size, s)]["subject_score"] for s in seeds]
    return torch.tensor([v for run in runs for v in run], dtype=torch.float64)


def t_interval(d: Tensor) -> tuple[float, float, float]:
    """Mean of d and its 95% t-interval: mean -+ t(0.975, k - 1) sd / sqrt(k)."""
    k, mean = len(d), float(d.mean())
    half = float(stats.t.ppf(0.975, k - 1) * d.std() / math.sqrt(k)) if k > 1 else math.nan
    return mean, mean - half, mean + half


def paired_differences(
    store: ScoreStore, methods: list[str], reference: str, full: int, seeds: tuple
) -> list[dict]:
    """Per method: its subject score minus `reference`'s on the same (seed, subject) pairs
    (every seed scores its own split of the subjects), the mean and 95% t-interval over the
    pairs, and on how many pairs it is ahead."""
    base = seed_subject_scores(store, reference, full, seeds)
    rows = []
    for m in methods:
        d = seed_subject_scores(store, m, full, seeds) - base
        mean, low, high = t_interval(d)
        rows.append(
            {
                "method": m,
                "mean": mean,
                "low": low,
                "high": high,
                "ahead": int((d > 0).sum()),
                "subjects": len(d),
            }
        )
    return rows
