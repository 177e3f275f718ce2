"""`condlora synth zoo`: one plain LoRA per subject folder, fine-tuned many at a time.

The collection that synthesis learns from is one LoRA per subject on one base model
(weights2weights: 65k rank-1 LoRAs on `to_q`, `to_v`). Here every subfolder of SUBJECTS is a
subject (its images flat, or in class subfolders `0/`, `1/`, ... for a class-conditional
base); its LoRA is fine-tuned on the frozen base (a `condlora train` run, or a diffusers
UNet2DModel folder as it is, whose LoRAs name the U-Net's own modules) with the base's own
denoising loss. A text model's base (a diffusers UNet2DConditionModel pipeline) trains each
subject on its prompt: a `prompt.txt` in the subject's folder for all its images, else the
images' own captions (a .txt beside each, or a metadata.jsonl); a latent model's subjects are
encoded by its VAE once (the posterior mean), as a latent run's images are.

Subjects train `subjects_per_batch` at a time in one batched model (`bank.py`: per-sample
LoRA weights). The loss is the sum of each subject's mean loss and Adam acts per
coordinate, and every subject draws its images, noise levels and noise from a generator of
its own, seeded by `seed` and the subject's name (`subject_generator`). So a subject's LoRA is
the one it would get alone with the same seed and steps: batching only saves time. Subjects
do not share their draws: a collection fine-tuned on common random numbers varies more
smoothly from subject to subject than LoRAs trained apart do. Each finished batch is on disk
before the next starts; a rerun skips the subjects done and refuses a folder made with other
settings.

    OUT/<subject>/               peft folders (what `synth collect` reads)
    OUT/embeddings.safetensors   subject -> embedding (`--encoder`), `synth collect --embeddings`
    OUT/zoo.json                 the settings, the base, and seconds per finished subject
"""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from condlora.core.config import to_dict
from condlora.core.errors import CondloraError, DataError
from condlora.core.files import check_folder_name, check_output_folder, write_text_atomic
from condlora.core.safetensors_io import write_weights
from condlora.data.images import folder_layout, load_captions, load_image_folder
from condlora.diffusion import Denoiser, EDMPrecond, Preconditioner
from condlora.image.build import caption_index
from condlora.image.diffusers_net import backbone_modules, diffusers_backbone
from condlora.lora.formats import LoRAWeights, write_lora
from condlora.lora.formats.peft import WEIGHTS_NAME
from condlora.synthesis.bank import bank_denoiser, subject_lora, subjects
from condlora.synthesis.config import ZooConfig
from condlora.synthesis.encoders import ImageEncoder, set_embedding

RECORD_FILE = "zoo.json"
EMBEDDINGS_FILE = "embeddings.safetensors"


def zoo_loss(
    denoiser: Denoiser,
    x0: Tensor,
    labels: Tensor | None,
    ids: Tensor,
    sigma: Tensor,
    noise: Tensor,
) -> Tensor:
    """Sum over subjects of each subject's mean denoising loss (equal images per subject)."""
    with subjects(denoiser, ids):
        loss = denoiser.loss(x0, sigma=sigma, noise=noise, class_labels=labels)
    return loss * len(ids.unique())


def zoo_sigma(
    precond: Preconditioner,
    n: int,
    generator: torch.Generator,
    log_mean: float | None,
    log_std: float | None = None,
) -> Tensor:
    """Noise levels for fine-tuning: the base's own, or for EDM ln(sigma) ~ N(log_mean, std^2)
    with std = log_std (None: the base's P_std)."""
    if log_mean is None or not isinstance(precond, EDMPrecond):
        return precond.sample_sigma(n, generator=generator)
    std = precond.P_std if log_std is None else log_std
    return (torch.randn(n, generator=generator) * std + log_mean).exp()


def train_bank(
    bank: Denoiser,
    steps: int,
    lr: float,
    next_batch: Callable[[], dict],
    progress: bool = False,
    average_last: float = 0.0,
) -> None:
    """Adam on the bank's LoRAs for `steps` steps of `zoo_loss` on next_batch(); the learning
    rate is constant, then decays linearly to 0 over the second half. average_last > 0: the
    LoRAs end as the mean of their iterates over that fraction of the last steps (Polyak)."""
    params = [p for p in bank.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, 2.0 * (1.0 - step / steps))
    )
    first_averaged = steps - round(average_last * steps)
    mean = [p.detach().clone() for p in params] if first_averaged < steps else []
    bank.train()
    for step in tqdm(range(steps), desc="fine-tuning", leave=False, disable=not progress):
        loss = zoo_loss(bank, **next_batch())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay.step()
        if step >= first_averaged:  # running mean of the iterates: m += (p - m) / count
            with torch.no_grad():
                for m, p in zip(mean, params, strict=True):
                    m.add_(p - m, alpha=1.0 / (step - first_averaged + 1))
    if first_averaged < steps:
        with torch.no_grad():
            for m, p in zip(mean, params, strict=True):
                p.copy_(m)


@dataclass(frozen=True)
class Subject:
    """One subject's images (N, C, R, R) in [-1, 1], their class labels or None, the files."""

    name: str
    images: Tensor
    labels: Tensor | None
    files: list[Path]
    captions: list[str] | None = None  # a text model's prompt of each image


PROMPT_FILE = "prompt.txt"  # a subject's one prompt for a text model


def subject_prompts(folder: Path) -> list[str]:
    """The prompt of each image of a subject folder: its prompt.txt, else the captions."""
    if (folder / PROMPT_FILE).is_file():
        prompt = (folder / PROMPT_FILE).read_text(encoding="utf-8").strip()
        return [prompt] * len(folder_layout(folder)[0])
    try:
        return load_captions(folder)
    except DataError as err:
        raise DataError(f"{err} (or a {PROMPT_FILE} for all of them)") from None


def _class_labels(folder: Path, labels: Tensor | None, classes: list[str], num: int) -> Tensor:
    """Labels of a class-subfolder layout as the base's class indices (folder names 0..K-1)."""
    if labels is None:
        raise DataError(
            f"{folder}: the base model is class-conditional ({num} classes): put the subject's "
            "images in class subfolders named 0, 1, ..."
        )
    bad = [c for c in classes if not (c.isdigit() and int(c) < num)]
    if bad:
        raise DataError(
            f"{folder}: class subfolders must be named 0..{num - 1} (the base's classes), "
            f"got {', '.join(bad[:5])}"
        )
    return torch.tensor([int(c) for c in classes])[labels]


def read_subjects(
    folder: str | Path, resolution: int, channels: int, num_classes: int, text: bool = False
) -> list:
    """Every subfolder of `folder` as a Subject (with its prompts for a `text` model),
    sorted by name; DataError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--subjects {folder} is not a folder (one subfolder per subject)")
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        check_folder_name(sub.name, "subject folder")
        images, labels, classes = load_image_folder(sub, resolution, channels)
        if num_classes:
            labels = _class_labels(sub, labels, classes, num_classes)
        prompts = subject_prompts(sub) if text else None
        found.append(
            Subject(
                sub.name, images, labels if num_classes else None, folder_layout(sub)[0], prompts
            )
        )
    if not found:
        raise DataError(f"--subjects {folder} holds no subject folders (one per subject)")
    return found


def model_subjects(base: Denoiser, found: list[Subject]) -> list[Subject]:
    """The subjects as the base's network takes them: a text model's prompts as caption
    indices (the base's prompt table set to every subject's prompts), a latent model's
    images as its VAE's latents."""
    net = diffusers_backbone(base)
    if net is None or (net.text is None and net.vae is None):
        return found
    if net.text is not None:
        prompts, _ = caption_index([c for s in found for c in s.captions])
        net.text.set_prompts(prompts)
        where = {p: i for i, p in enumerate(prompts)}
    out = []
    for s in found:
        labels = s.labels
        if net.text is not None:
            labels = torch.tensor([where[c] for c in s.captions])
        images = s.images if net.vae is None else net.vae.encode(s.images)
        out.append(dataclasses.replace(s, images=images, labels=labels))
    return out


def subject_batch(
    precond: Preconditioner,
    members: list[Subject],
    generators: list[torch.Generator],
    per_subject: int,
    log_mean: float | None,
) -> dict[str, Tensor | None]:
    """One step's batch: `per_subject` images of each subject, drawn with its own generator."""
    parts: dict[str, list[Tensor]] = {"x0": [], "labels": [], "sigma": [], "noise": []}
    for subject, g in zip(members, generators, strict=True):
        index = torch.randint(0, len(subject.images), (per_subject,), generator=g)
        parts["x0"].append(subject.images[index])
        parts["sigma"].append(zoo_sigma(precond, per_subject, g, log_mean))
        parts["noise"].append(torch.randn((per_subject, *subject.images.shape[1:]), generator=g))
        if subject.labels is not None:
            parts["labels"].append(subject.labels[index])
    batch = {k: torch.cat(v) if v else None for k, v in parts.items()}
    batch["ids"] = torch.arange(len(members)).repeat_interleave(per_subject)
    return batch


def subject_generator(seed: int, name: str) -> torch.Generator:
    """The generator of one subject's draws (images, noise levels, noise): seeded by the
    zoo's seed and the subject's name, so it is the same alone or in any batch."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def fine_tune_subjects(
    base: Denoiser, members: list[Subject], cfg: ZooConfig, progress: bool = False
) -> list[LoRAWeights]:
    """The LoRA of each subject, fine-tuned together on the frozen base (one batched model)."""
    scale = cfg.alpha / cfg.rank
    bank = bank_denoiser(base, len(members), cfg.rank, list(cfg.targets), scale, cfg.seed)
    generators = [subject_generator(cfg.seed, s.name) for s in members]

    def next_batch() -> dict:
        return subject_batch(
            base.precond, members, generators, cfg.images_per_subject, cfg.log_sigma_mean
        )

    train_bank(bank, cfg.steps, cfg.lr, next_batch, progress)
    _, prefix = backbone_modules(base)  # a diffusers U-Net's LoRA names its own modules
    loras = [subject_lora(bank, k).modules for k in range(len(members))]
    return [LoRAWeights({n.removeprefix(prefix): m for n, m in w.items()}) for w in loras]


def _check_record(out: Path, record: dict) -> dict:
    """The zoo record in `out` (a fresh one if there is none); CondloraError if it differs."""
    path = out / RECORD_FILE
    if not path.is_file():
        return {**record, "seconds": {}}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CondloraError(
            f"{path} is damaged ({err}): remove it to start the zoo again"
        ) from None
    for key in ("config", "base"):
        if old.get(key) != record[key]:
            raise CondloraError(
                f"{out} holds a zoo made with another {key} ({old.get(key)} against "
                f"{record[key]}): give a new --out"
            )
    return old


def write_embeddings(out: Path, subjects_: Iterable[Subject], encoder: ImageEncoder) -> Path:
    """OUT/embeddings.safetensors: each subject's set embedding of its images (as `synth
    generate --images` embeds a subject)."""
    vectors = {s.name: set_embedding(encoder, s.files) for s in subjects_}
    write_weights(out / EMBEDDINGS_FILE, vectors, {"format": "condlora.subject_embeddings"})
    return out / EMBEDDINGS_FILE


def make_zoo(
    base: Denoiser,
    found: list[Subject],
    cfg: ZooConfig,
    out: str | Path,
    base_name: str = "",
    progress: bool = True,
) -> dict:
    """Fine-tune the LoRA of every subject not on disk yet into OUT; returns the record."""
    out = check_output_folder(out, "--out")
    # the settings as JSON has them; how many subjects share a batch changes no result
    settings = json.loads(json.dumps(to_dict(cfg)))
    settings.pop("subjects_per_batch")
    settings["draws"] = "per subject"  # zoos of earlier versions shared them (another result)
    record = _check_record(out, {"config": settings, "base": base_name})
    pending = [s for s in found if not (out / s.name / WEIGHTS_NAME).is_file()]
    size = cfg.subjects_per_batch
    batches = [pending[i : i + size] for i in range(0, len(pending), size)]
    out.mkdir(parents=True, exist_ok=True)
    for members in tqdm(batches, desc="zoo (batches of subjects)", disable=not progress):
        start = time.perf_counter()
        loras = fine_tune_subjects(base, members, cfg, progress)
        for subject, weights in zip(members, loras, strict=True):
            write_lora(weights, out / subject.name, "peft")
        seconds = (time.perf_counter() - start) / len(members)
        record["seconds"].update({s.name: round(seconds, 3) for s in members})
        write_text_atomic(out / RECORD_FILE, json.dumps(record, indent=1, sort_keys=True))
    return record
