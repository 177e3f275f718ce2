"""`condlora synth eval`: the identity benchmark of a synthesis model on held-out subjects.

For every held-out subject (a folder of its real images, as `synth zoo` reads them) each
method writes its LoRA from the subject's embedding (the encoder over its real images):

    generator   the model itself (`synth generate`)
    nearest     the collection's LoRA whose embedding is closest (cosine)
    pca-ridge   PCA of the collection with a ridge map from the embedding (weights2weights)
    fine-tuned  the subject's own LoRA, where `--finetuned DIR` holds one (the ceiling)
    no LoRA     the base model alone (the floor)

Every method's LoRA samples from the same starting noise (and classes, cycling 0..K-1 on a
class-conditional base). Scores per subject and method:

    subject score   cos(the samples' set embedding, the subject's: `set_embedding`)
    normalised      (method - no LoRA) / (fine-tuned - no LoRA) on the subject-mean scores
    class accuracy  with `--judge` (a digits classifier file): the judge reads the class asked

    OUT/report.md, OUT/results.json   the table (mean +- std over subjects) and every score
    OUT/grids/<subject>.png           rows: methods (in the table's order), columns: samples
    OUT/samples/<subject>/<method>/   the samples as PNG files (what the encoder read)
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from condlora.core.errors import DataError
from condlora.core.files import check_output_folder, write_text_atomic
from condlora.core.images import save_grid, to_uint8
from condlora.core.reporting import (
    markdown_table,
    mean_std,
    plus_minus,
    progress_bar,
    provenance_line,
)
from condlora.diffusion import Denoiser, sample
from condlora.image.config import Config
from condlora.image.diffusers_net import backbone_modules
from condlora.lora.formats import LoRAWeights, read_lora
from condlora.metrics import DigitsClassifier, classifier_outputs
from condlora.synthesis.bank import bank_denoiser, load_subject, subjects
from condlora.synthesis.baselines import Nearest, fit_pca_ridge
from condlora.synthesis.collection import LoRADataset
from condlora.synthesis.config import BaselineConfig
from condlora.synthesis.encoders import ImageEncoder, set_embedding
from condlora.synthesis.generate import SynthModel
from condlora.synthesis.zoo import Subject

NO_LORA, FINE_TUNED = "no LoRA", "fine-tuned"


def method_loras(
    model: SynthModel, dataset: LoRADataset, embeddings: Tensor
) -> dict[str, list[LoRAWeights]]:
    """Each method's LoRA for every subject (embeddings (S, E)): generator, nearest, pca-ridge."""
    if dataset.spec.size != model.info.spec.size:
        raise DataError(f"{dataset.path}: another layout than the model's collection")
    pca = fit_pca_ridge(dataset, model.info.standardise, BaselineConfig())
    vectors = {
        "generator": model.vectors(embeddings)[:, 0],
        "nearest": Nearest(dataset.path).vectors(embeddings)[:, 0],
        "pca-ridge": model.info.unstandardise(pca.predict(embeddings.float())),
    }
    return {name: [model.lora(v) for v in rows] for name, rows in vectors.items()}


def sample_labels(cfg: Config, n: int) -> Tensor | None:
    """Classes of a subject's n samples: 0..K-1 cycling on a class-conditional base, else None."""
    k = cfg.data.num_classes if cfg.net.class_conditional else 0
    return torch.arange(n) % k if k else None


@torch.no_grad()
def sample_with(
    base: Denoiser, loras: list[LoRAWeights] | None, cfg: Config, n: int, seed: int
) -> Tensor:
    """(S, n, C, R, R) samples: subject k with loras[k] (None: the base alone, S = 1); every
    call with the same seed and n starts each subject from the same noise."""
    num = 1 if loras is None else len(loras)
    image = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    noise = torch.randn((n, *image), generator=torch.Generator().manual_seed(seed))
    labels, d = sample_labels(cfg, n), cfg.diffusion
    y = None if labels is None else labels.repeat(num)
    denoiser = base
    if loras is not None:
        rank = max(m.rank for lora in loras for m in lora.modules.values())
        denoiser = bank_denoiser(base, num, rank, sorted(loras[0].modules)).eval()
        _, prefix = backbone_modules(base)  # a diffusers U-Net's LoRAs name its own modules
        for k, lora in enumerate(loras):
            named = {prefix + n: m for n, m in lora.modules.items()}
            load_subject(denoiser, k, LoRAWeights(named))
    ids = torch.arange(num).repeat_interleave(n)
    generator = torch.Generator().manual_seed(seed + 1)  # per-step noise of ddpm / iddpm
    start = noise.repeat(num, 1, 1, 1)
    with subjects(denoiser, ids) if loras is not None else contextlib.nullcontext():
        x = sample(
            denoiser, start.shape, d.sampler, d.sample_steps, generator, noise=start, class_labels=y
        )
    return x.clamp(-1, 1).reshape(num, n, *image)


def save_samples(folder: Path, images: Tensor) -> list[Path]:
    """Write (n, C, R, R) samples as PNG files 000.png, 001.png, ... into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, pixels in enumerate(to_uint8(images)):
        path = folder / f"{j:03d}.png"
        Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(path)
        paths.append(path)
    return paths


def judge_accuracy(judge: DigitsClassifier, images: Tensor, labels: Tensor) -> float:
    """Share of images that the judge reads as their requested class."""
    logits = classifier_outputs(judge, images)[1]
    return float((logits.argmax(1) == labels).float().mean())


def summary_rows(results: dict[str, dict[str, dict]]) -> list[list[str]]:
    """[method, subject score, normalised, class accuracy] per method, mean ± std over subjects."""
    names = list(next(iter(results.values())))
    mean = {m: sum(r[m]["score"] for r in results.values()) / len(results) for m in names}
    rows = []
    for m in names:
        scores = [r[m]["score"] for r in results.values()]
        norm = "-"
        if FINE_TUNED in mean and mean[FINE_TUNED] != mean[NO_LORA]:
            ratio = (mean[m] - mean[NO_LORA]) / (mean[FINE_TUNED] - mean[NO_LORA])
            norm = f"{round(ratio, 2) + 0.0:.2f}"  # + 0.0: no "-0.00"
        accs = [r[m]["accuracy"] for r in results.values() if r[m]["accuracy"] is not None]
        acc = f"{100 * sum(accs) / len(accs):.1f}%" if accs else "-"
        rows.append([m, plus_minus(*mean_std(scores)), norm, acc])
    return rows


def write_report(out: Path, results: dict[str, dict[str, dict]], header: str) -> Path:
    """OUT/results.json and OUT/report.md (the table, then what the columns mean)."""
    write_text_atomic(out / "results.json", json.dumps(results, indent=1, sort_keys=True))
    header_row = ["method", "subject score", "normalised", "class accuracy"]
    table = markdown_table(header_row, summary_rows(results))
    text = "\n".join(
        [
            "# Identity benchmark (`condlora synth eval`)",
            "",
            provenance_line(),
            "",
            header,
            "",
            *table,
            "",
            "Mean ± std over the held-out subjects. Subject score: cosine of the samples' set",
            "embedding with the subject's (its real images, the same encoder). Normalised:",
            "(method - no LoRA) / (fine-tuned - no LoRA) on the mean scores. Grids: grids/.",
            "",
        ]
    )
    return write_text_atomic(out / "report.md", text)


def evaluate_subjects(  # noqa: PLR0913 - what the benchmark compares, one argument each
    model: SynthModel,
    dataset: LoRADataset,
    base: Denoiser,
    cfg: Config,
    held_out: list[Subject],
    encoder: ImageEncoder,
    out: str | Path,
    finetuned: Path | None = None,
    judge: DigitsClassifier | None = None,
    num: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, dict]]:
    """Score every method on every held-out subject; write the report into OUT; return
    {subject: {method: {"score", "accuracy"}}}."""
    out = check_output_folder(out, "--out")
    targets = torch.stack([set_embedding(encoder, s.files) for s in held_out])
    loras: dict[str, list[LoRAWeights] | None] = {**method_loras(model, dataset, targets)}
    if finetuned is not None:
        missing = [s.name for s in held_out if not (finetuned / s.name).exists()]
        if missing:
            raise DataError(f"--finetuned {finetuned} holds no LoRA of {', '.join(missing[:5])}")
        loras[FINE_TUNED] = [read_lora(finetuned / s.name) for s in held_out]
    loras[NO_LORA] = None
    labels = sample_labels(cfg, num)
    samples = {}
    with progress_bar(progress, total=len(loras), desc="sampling (methods)") as bar:
        for method, method_loras_ in loras.items():
            samples[method] = sample_with(base, method_loras_, cfg, num, seed)
            bar.update()
    results: dict[str, dict[str, dict]] = {}
    for k, subject in enumerate(held_out):
        rows = []
        for method, images in samples.items():
            x = images[k if len(images) > 1 else 0]
            folder = out / "samples" / subject.name / method.replace(" ", "-")
            score = float(set_embedding(encoder, save_samples(folder, x)) @ targets[k])
            acc = (
                judge_accuracy(judge, x, labels)
                if judge is not None and labels is not None
                else None
            )
            results.setdefault(subject.name, {})[method] = {"score": score, "accuracy": acc}
            rows.append(x)
        save_grid(torch.cat(rows), out / "grids" / f"{subject.name}.png", nrow=num)
    header = (
        f"Model {model.folder}, {len(held_out)} held-out subjects, {num} samples each "
        f"(sampler {cfg.diffusion.sampler}, {cfg.diffusion.sample_steps} steps, seed {seed})."
    )
    write_report(out, results, header)
    return results
