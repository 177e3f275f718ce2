"""`condlora synth demo`: every stage of the embedded demo, each reused when already done.

out/demo.json              the demo and base configs (a folder holds one demo)
out/base/                  the base model, unless the quickstart's baseline is reused
out/judge.safetensors      digits judge (DigitsClassifier on plain and styled digits)
out/zoo/                   peft LoRAs of every subject (zoo.py), fine-tuned once (with
                           `redraw_zoo`: the first seed's; out/seed<S>/zoo/ the others')
out/encoder.safetensors    the first seed's subject encoder,
out/embeddings.safetensors its reference embeddings of every subject (name -> vector),
out/dataset/               its train.safetensors and heldout.safetensors (`collect`: the
                           training subjects and the scored ones, validation or test),
out/loras/                 links to its training and scored zoo LoRAs
out/seed<S>/               the same four for every other seed (each its own split)
out/methods/               what the methods train, per seed and training-set size
out/scores.json, out/samples/, out/stages.json, out/report.md, out/*.png

Choosing settings: `--split val` scores the validation subjects; the report's table is the
test subjects', scored once with the chosen settings.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from condlora.apps.synthesis_demo import report
from condlora.apps.synthesis_demo.config import DemoConfig, unseen_corner
from condlora.apps.synthesis_demo.config import quick as quick_config
from condlora.apps.synthesis_demo.generative import generative_methods, run_stages
from condlora.apps.synthesis_demo.methods import (
    DemoData,
    Method,
    finetuned,
    no_lora,
    simple_methods,
)
from condlora.apps.synthesis_demo.scoring import (
    ScoreStore,
    Scoring,
    normalised,
    paired_differences,
    run_key,
    score_method,
    summary_rows,
)
from condlora.apps.synthesis_demo.stages import (
    StageClock,
    base_model,
    check_out_dir,
    collect_datasets,
    digits_judge,
    embeddings_file,
    subject_encoder,
)
from condlora.apps.synthesis_demo.styles import FACTORS, apply_style, describe
from condlora.apps.synthesis_demo.zoo import Subjects, build_zoo, make_subjects
from condlora.core.config import find_config
from condlora.core.files import write_text_atomic
from condlora.diffusion import Denoiser
from condlora.image.build import build_data
from condlora.image.config import Config, load_config
from condlora.metrics import DigitsClassifier, class_accuracy, classifier_outputs

BASE_CONFIG = "digits-baseline.yaml"  # the base model: the quickstart's baseline
QUICKSTART_BASE = Path("runs/quickstart/baseline")  # where `condlora quickstart` trains it
SCORES_FILE = "scores.json"


def held_out_digits(images: Tensor, labels: Tensor) -> Tensor:
    """One held-out digit of every class, 0..9 (for the grids)."""
    return torch.stack([images[torch.nonzero(labels == c)[0, 0]] for c in range(10)])


@dataclass(frozen=True)
class SeedRun:
    """One seed of the table: its split of the subjects, its encoder, its collection."""

    seed: int
    subs: Subjects
    scored: list[int]  # the subjects it scores (validation or test)
    data: DemoData  # its training collection and the scored subjects' queries
    scoring: Scoring


def prepare_seed(
    out: Path,
    seed: int,
    cfg: DemoConfig,
    base: Denoiser,
    judge: DigitsClassifier,
    digits: tuple[Tensor, Tensor],
    zoo_dir: Path,
    clock: StageClock,
) -> SeedRun:
    """A seed's split, encoder, embeddings and collections, each reused: in `out` itself for
    the first seed (what `condlora serve` reads), in out/seed<S>/ for the others."""
    train_x, hold_x = digits
    subs = make_subjects(cfg, seed)
    scored = subs.scored(cfg.split)
    seed_dir = out if seed == cfg.score_seeds[0] else out / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    encoder = subject_encoder(seed_dir / "encoder.safetensors", train_x, cfg, clock, seed)
    embeddings = embeddings_file(seed_dir / "embeddings.safetensors", subs, encoder, train_x, cfg)
    collect_datasets(seed_dir, zoo_dir, subs, scored, clock, seed)
    queries = torch.stack([embeddings[subs.names[i]] for i in scored])
    targets = encoder.embed_sets(torch.stack([apply_style(hold_x, subs.styles[i]) for i in scored]))
    data = DemoData.load(seed_dir / "dataset" / "train.safetensors", queries, out / "methods")
    ft = DemoData.load(seed_dir / "dataset" / "heldout.safetensors", queries, seed_dir).vectors
    scoring = Scoring(base, encoder, judge, targets, ft, data.std, cfg)
    return SeedRun(seed, subs, scored, data, scoring)


def run_demo(
    out: str | Path,
    cfg: DemoConfig,
    base_cfg: Config,
    base_candidates: list[Path] | None = None,
    extra_methods: list[Method] | None = None,
    progress: bool = True,
    workers: int = 2,
) -> Path:
    """Run (or finish) every stage of the demo in `out`; returns the report's path.

    base_candidates: finished runs of `base_cfg` to reuse (default: the quickstart's);
    extra_methods: the methods scored between fine-tuned and the simple ones (default:
    `generative_methods()`); workers: generative models trained side by side. Every seed
    of `cfg.score_seeds` draws its own split of the subjects, encoder and collection.
    """
    out = Path(out)
    check_out_dir(out, cfg, base_cfg)
    clock = StageClock(out / "stages.json")
    candidates = [QUICKSTART_BASE] if base_candidates is None else base_candidates
    base = base_model(base_cfg, out, candidates, clock, progress)
    (train_x, train_y), (hold_x, hold_y) = build_data(base_cfg)
    judge = digits_judge(out / "judge.safetensors", train_x, train_y, cfg, clock)
    zoos = {s: zoo_of_seed(out, cfg, s) for s in cfg.score_seeds}
    print(f"[demo] zoo{'s' if len(set(zoos.values())) > 1 else ''}")
    per_zoo = [
        build_zoo(base, train_x, train_y, cfg, folder, progress, zoo_seed=zoo_seed)
        for folder, zoo_seed in sorted(set(zoos.values()))
    ]
    per_subject = sum(per_zoo) / len(per_zoo)
    total = sum(per_zoo) * cfg.num_subjects
    clock.record("zoo", f"{total:.0f} s ({per_subject:.2f} s per subject and zoo)")
    seeds = {
        s: prepare_seed(out, s, cfg, base, judge, (train_x, hold_x), zoos[s][0], clock)
        for s in cfg.score_seeds
    }
    first = seeds[cfg.score_seeds[0]]
    methods = [
        finetuned({s: run.scoring.finetuned for s, run in seeds.items()}, per_subject),
        *(
            extra_methods
            if extra_methods is not None
            else generative_methods(cfg.generative, cfg.raw_diffusion)
        ),
        *simple_methods(),
        no_lora(),
    ]
    store = ScoreStore(out / SCORES_FILE)
    _score_all(store, seeds, methods, out / "samples", cfg, clock, progress, workers)
    info = _report_info(cfg, first, judge, per_subject, hold_x, hold_y)
    return _write_report(out, store, methods, first, hold_x, hold_y, info, clock)


def zoo_of_seed(out: Path, cfg: DemoConfig, seed: int) -> tuple[Path, int]:
    """(folder, zoo seed) of the zoo a seed of the table collects from: out/zoo (zoo 0) for
    every seed, or with `cfg.redraw_zoo` each seed's own zoo (out/zoo for the first)."""
    if not cfg.redraw_zoo:
        return out / "zoo", 0
    first = seed == cfg.score_seeds[0]
    return (out / "zoo" if first else out / f"seed{seed}" / "zoo"), seed


def _sample_file(folder: Path, method: str) -> Path:
    return folder / (re.sub(r"[^A-Za-z0-9._-]+", "_", method) + ".safetensors")


def _score_all(
    store: ScoreStore,
    seeds: dict[int, SeedRun],
    methods: list[Method],
    samples_dir: Path,
    cfg: DemoConfig,
    clock: StageClock,
    progress: bool,
    workers: int,
) -> None:
    """Every (method, size, seed) run not in the store yet, each seed on its own split and
    collection; the curve and the grid samples on the first seed. The training stages of
    those runs go first, `workers` of them side by side."""
    first = cfg.score_seeds[0]
    full = seeds[first].data.size
    runs = [(m, full, s) for m in methods for s in cfg.score_seeds]
    # the curve's smaller collections (unseen-corner: its training subjects are fewer than
    # num_train, and the whole collection is the table's)
    runs += [(m, n, first) for m in methods if m.on_curve for n in cfg.sizes() if n < full]
    samples_dir.mkdir(parents=True, exist_ok=True)
    todo = [
        (m, n, s)
        for m, n, s in runs
        if run_key(m.name, n, s) not in store
        or (n == full and s == first and not _sample_file(samples_dir, m.name).is_file())
    ]
    if not todo:
        return
    # each subset's file written once
    datas = {(n, s): seeds[s].data.subset(n) for n, s in {(n, s) for _, n, s in todo}}
    stages = [st for m, n, s in todo if m.stages for st in m.stages(datas[n, s], s)]
    if stages:
        print(f"[demo] training generative models ({workers} at a time)")
        start = time.perf_counter()
        run_stages(stages, workers, progress)
        clock.record("generative training", f"{time.perf_counter() - start:.0f} s")
    print(f"[demo] scoring: {len(todo)} runs")
    start = time.perf_counter()
    for method, size, seed in tqdm(todo, desc="scoring", disable=not progress):
        scoring = seeds[seed].scoring
        record, samples = score_method(scoring, method, datas[size, seed], seed, progress)
        if size == full and seed == first:
            keep = samples[: cfg.grid_subjects, :10].contiguous()
            save_file({"samples": keep}, _sample_file(samples_dir, method.name))
        store.put(run_key(method.name, size, seed), record)
    clock.record("scoring", f"{time.perf_counter() - start:.0f} s ({len(todo)} runs)")


def _report_info(
    cfg: DemoConfig,
    first: SeedRun,
    judge: DigitsClassifier,
    per_subject: float,
    hold_x: Tensor,
    hold_y: Tensor,
) -> dict:
    """The numbers the report's text quotes (the encoder's on the first seed's split)."""
    subs, data, targets = first.subs, first.data, first.scoring.targets
    heldout = first.scored
    # the reference digits (training split) against the held-out digits, both real and styled
    sims = data.queries @ targets.T
    real = sims.diagonal()
    off = sims[~torch.eye(len(targets), dtype=torch.bool)]
    styled = torch.cat([apply_style(hold_x, subs.styles[i]) for i in heldout])
    _, logits = classifier_outputs(judge, styled)
    ranges = ", ".join(f"{f} {getattr(cfg.ranges, f)}" for f in FACTORS)
    return {
        "seeds": cfg.score_seeds,
        "full": cfg.num_subjects == DemoConfig().num_subjects and cfg.steps >= DemoConfig().steps,
        "ranges": ranges,
        "num_train": len(subs.train),  # the setting's counts (unseen-corner: its own)
        "num_val": len(subs.val),
        "num_heldout": len(subs.heldout),
        "split": cfg.split,
        "setting": cfg.setting,
        "redraw_zoo": cfg.redraw_zoo,
        "corner": cfg.corner,
        "rank": cfg.rank,
        "targets": ", ".join(cfg.targets),
        "lora_numbers": data.spec.size,
        "seconds_per_subject": per_subject,
        "subjects_per_batch": cfg.subjects_per_batch,
        "encoder_same": float(real.mean()),
        "encoder_different": float(off.mean()) if len(off) else float("nan"),
        "reference_images": cfg.reference_images,
        "samples": 10 * cfg.samples_per_class,
        "real_score": float(real.mean()),
        "judge_real": class_accuracy(logits, hold_y.repeat(len(heldout))),
    }


def _write_report(
    out: Path,
    store: ScoreStore,
    methods: list[Method],
    first_run: SeedRun,
    hold_x: Tensor,
    hold_y: Tensor,
    info: dict,
    clock: StageClock,
) -> Path:
    """Table, curve, grids (of the first seed's scored subjects) and report.md."""
    cfg_seeds, full, subs = info["seeds"], first_run.data.size, first_run.subs
    rows = summary_rows(store, methods, full, cfg_seeds)
    first = cfg_seeds[0]
    sizes = sorted({n for n in (int(k.split("/")[1]) for k in store.runs) if n <= full})
    curve = {
        m.name: [
            (n, float(normalised(store, m.name, n, full, (first,))[0]), 0.0)
            for n in sizes
            if run_key(m.name, n, first) in store
        ]
        for m in methods
        if m.on_curve
    }
    report.plot_curve(curve, out / "curve.png")
    digits = held_out_digits(hold_x, hold_y)
    samples = {m.name: load_file(_sample_file(out / "samples", m.name))["samples"] for m in methods}
    grids = []
    for g, i in enumerate(first_run.scored[: len(next(iter(samples.values())))]):
        rows_g = [apply_style(digits, subs.styles[i])] + [samples[m.name][g] for m in methods]
        file = f"grid-{subs.names[i]}.png"
        report.save_subject_grid(rows_g, out / file)
        grids.append((f"{subs.names[i]}: {describe(subs.styles[i])}", file))
    names = ["real styled digits"] + [m.name for m in methods]
    others = [m.name for m in methods if m.name not in (report.REFERENCE, "no LoRA")]
    paired = []
    if any(m.name == report.REFERENCE for m in methods):
        paired = paired_differences(store, others, report.REFERENCE, full, tuple(cfg_seeds))
    text = report.render_demo_report(info, rows, curve, clock.times, grids, names, paired)
    path = out / "report.md"
    write_text_atomic(path, text)
    return path


def demo_configs(
    quick: bool, setting: str = "box", split: str = "test", redraw_zoo: bool = False
) -> tuple[DemoConfig, Config]:
    """The demo config (full or quick, in a setting, scoring a split, a zoo per seed or one)
    and the quickstart's baseline config."""
    cfg = quick_config() if quick else DemoConfig()
    if setting == "unseen-corner":
        cfg = unseen_corner(cfg)
    cfg = dataclasses.replace(cfg, split=split, redraw_zoo=redraw_zoo)
    return cfg, load_config(find_config(BASE_CONFIG))


def default_out(
    quick: bool, setting: str = "box", split: str = "test", redraw_zoo: bool = False
) -> str:
    """runs/synth-demo[-quick][-unseen-corner][-val][-redraw-zoo]."""
    parts = ["runs/synth-demo", "-quick" if quick else ""]
    parts += ["" if setting == "box" else f"-{setting}", "" if split == "test" else f"-{split}"]
    parts += ["-redraw-zoo" if redraw_zoo else ""]
    return "".join(parts)
