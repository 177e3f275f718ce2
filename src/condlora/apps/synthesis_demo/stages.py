"""The demo's stages that build something once and reuse it: each checks for its output first.

Every stage that does work records its seconds in stages.json (`StageClock`); a folder holds
one demo, guarded by demo.json.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from condlora.apps.synthesis_demo.config import DemoConfig
from condlora.apps.synthesis_demo.encoder import (
    SubjectEncoder,
    load_encoder,
    save_encoder,
    train_encoder,
)
from condlora.apps.synthesis_demo.styles import apply_style, sample_styles
from condlora.apps.synthesis_demo.zoo import Subjects
from condlora.core.config import to_dict
from condlora.core.errors import CondloraError
from condlora.core.files import write_text_atomic
from condlora.diffusion import Denoiser
from condlora.image.config import Config
from condlora.image.task import load_run, saved_step, train_or_reuse
from condlora.metrics import (
    DigitsClassifier,
    load_classifier,
    save_classifier,
    train_digits_classifier,
)
from condlora.synthesis.collection import collect

JUDGE_COPIES = 4  # styled copies of every training digit in the judge's data


class StageClock:
    """Seconds of each stage when it did its work, kept in stages.json across reruns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.times: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, stage: str, text: str) -> None:
        """Keep a stage's time (or how it was reused) and rewrite the file."""
        self.times[stage] = text
        write_text_atomic(self.path, json.dumps(self.times, indent=1))

    def timed(self, stage: str, work: Callable[[], object]) -> object:
        """Run `work`, record its seconds under `stage`, return its result."""
        print(f"[demo] {stage}")
        start = time.perf_counter()
        result = work()
        self.record(stage, f"{time.perf_counter() - start:.0f} s")
        return result


def with_defaults(saved: dict, defaults: dict) -> dict:
    """`saved` with the keys it lacks taken from `defaults`, nested dicts alike (a demo
    folder written before a knob existed computed what the knob's default computes)."""
    merged = dict(saved)
    for key, value in defaults.items():
        if key not in merged:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = with_defaults(merged[key], value)
    return merged


def check_out_dir(out: Path, cfg: DemoConfig, base_cfg: Config) -> None:
    """Write demo.json, or check that the folder holds a demo of the same configs."""
    record = {"demo": json.loads(cfg.to_json()), "base": to_dict(base_cfg)}
    path = out / "demo.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if isinstance(saved.get("demo"), dict):  # knobs added since: their defaults
            saved["demo"] = with_defaults(saved["demo"], json.loads(DemoConfig().to_json()))
        changed = [k for k in ("demo", "base") if saved.get(k) != json.loads(json.dumps(record[k]))]
        if changed:
            raise CondloraError(
                f"{out} holds a demo of another {' and '.join(changed)} config: "
                "delete it or pass another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1, sort_keys=True))


def base_model(
    base_cfg: Config, out: Path, candidates: list[Path], clock: StageClock, progress: bool
) -> Denoiser:
    """A finished run of `base_cfg`: the first candidate holding one, else trained in out/base."""

    for run_dir in candidates:
        try:
            if saved_step(run_dir, base_cfg) >= base_cfg.train.max_steps:
                clock.record("base model", f"reused {run_dir}")
                return load_run(run_dir)[1]
        except CondloraError:  # another config there: not ours to reuse
            continue
    run_dir = out / "base"
    if saved_step(run_dir, base_cfg) < base_cfg.train.max_steps:
        clock.timed("base model", lambda: train_or_reuse(base_cfg, run_dir, progress))
    return load_run(run_dir)[1]


def digits_judge(
    path: Path, images: Tensor, labels: Tensor, cfg: DemoConfig, clock: StageClock
) -> DigitsClassifier:
    """The digits judge: a DigitsClassifier trained on the training digits, plain and styled."""
    if path.is_file():
        return load_classifier(path)

    def train() -> DigitsClassifier:
        styles = sample_styles(JUDGE_COPIES * len(images), cfg.ranges, cfg.seed + 1)
        styled = apply_style(images.repeat(JUDGE_COPIES, 1, 1, 1), styles)
        all_labels = labels.repeat(JUDGE_COPIES + 1)
        model = train_digits_classifier(
            torch.cat([images, styled]), all_labels, cfg.judge_steps, cfg.seed
        )
        save_classifier(model, path)
        return model

    return clock.timed("digits judge", train)


def subject_encoder(
    path: Path, images: Tensor, cfg: DemoConfig, clock: StageClock, seed: int = 0
) -> SubjectEncoder:
    """The cached subject encoder of a seed of the table, or one trained now (seeded by
    cfg.seed + seed: every seed of the table has its own encoder)."""
    if path.is_file():
        return load_encoder(path)

    def train() -> SubjectEncoder:
        model = train_encoder(
            images, cfg.ranges, cfg.encoder_steps, seed=cfg.seed + seed, dim=cfg.encoder_dim
        )
        save_encoder(model, path)
        return model

    return clock.timed(f"subject encoder (seed {seed})", train)


def reference_sets(subs: Subjects, images: Tensor, cfg: DemoConfig) -> Tensor:
    """(S, n, 1, R, R): each subject's reference digits (seeded picks), in its style."""
    sets = []
    for i in range(len(subs.names)):
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed + i))
        sets.append(apply_style(images[pick[: cfg.reference_images]], subs.styles[i]))
    return torch.stack(sets)


def embeddings_file(
    path: Path, subs: Subjects, encoder: SubjectEncoder, images: Tensor, cfg: DemoConfig
) -> dict[str, Tensor]:
    """name -> reference embedding of every subject, cached in a safetensors file."""
    if not path.is_file():
        embeddings = encoder.embed_sets(reference_sets(subs, images, cfg))
        tmp = path.with_name(path.name + ".tmp")
        save_file({n: e.contiguous() for n, e in zip(subs.names, embeddings, strict=True)}, tmp)
        os.replace(tmp, path)
    return load_file(path)


def _link_folder(folder: Path, zoo_dir: Path, subs: Subjects, members: list[int]) -> Path:
    """A folder of (relative) links to the members' zoo LoRAs, what `collect` reads; made
    afresh."""
    if folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i in members:
        target = subs.folder(zoo_dir, i).resolve()
        (folder / subs.names[i]).symlink_to(os.path.relpath(target, folder.resolve()))
    return folder


def collect_datasets(
    seed_dir: Path, zoo_dir: Path, subs: Subjects, scored: list[int], clock: StageClock, seed: int
) -> None:
    """A seed's training LoRAs and its scored (validation or test) LoRAs as two `collect`
    dataset files in seed_dir/dataset, the scored LoRAs aligned to the training collection's
    reference (the same coordinates); seed_dir/loras/train and loras/scored link to them."""
    folder = seed_dir / "dataset"
    train, heldout = folder / "train.safetensors", folder / "heldout.safetensors"
    if train.is_file() and heldout.is_file():
        return
    embeddings = seed_dir / "embeddings.safetensors"

    def work() -> None:
        links = seed_dir / "loras"
        collect(_link_folder(links / "train", zoo_dir, subs, subs.train), train, embeddings)
        scored_links = _link_folder(links / "scored", zoo_dir, subs, scored)
        collect(scored_links, heldout, embeddings, align_to=train)

    clock.timed(f"collect (seed {seed})", work)
