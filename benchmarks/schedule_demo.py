"""Learned strength schedules against constant strengths on the synthesis demo's digits zoo.

For each held-out zoo LoRA (a handwriting style fine-tuned on the digits base model) and
each seed: fit a strength schedule s(t) on the subject's styled training digits
(`condlora.image.strength`), then draw the ten digits from the same starting noise at
constant strengths 0, 0.2, ..., 1.2 and at the learned schedule, and score them as the
synthesis demo does: subject score (the subject encoder's cosine to the subject's real
held-out digits) and class accuracy (the digits judge). The preservation weight is chosen
on a validation split (training-zoo subjects), never on the scored ones.

    python benchmarks/schedule_demo.py --demo runs/synth-demo --out runs/schedule-demo

--demo is a `condlora synth demo` folder: its base model, judge, encoder and zoo are
reused, and only the missing zoo batches are fine-tuned (the quickstart's baseline,
runs/quickstart/baseline, or --base-run, is reused as the base model when finished).
Writes into --out: table.md, tradeoff.png, results.json (every score), atomically.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from timing import machine, print_json
from torch import Tensor

from condlora.apps.synthesis_demo.config import DemoConfig, tiny
from condlora.apps.synthesis_demo.run import QUICKSTART_BASE, demo_configs
from condlora.apps.synthesis_demo.scoring import class_accuracies, digit_labels, subject_scores
from condlora.apps.synthesis_demo.stages import (
    StageClock,
    base_model,
    check_out_dir,
    digits_judge,
    subject_encoder,
)
from condlora.apps.synthesis_demo.styles import apply_style
from condlora.apps.synthesis_demo.zoo import build_zoo, make_subjects
from condlora.core.config import find_config
from condlora.core.files import replace_atomically, write_text_atomic
from condlora.core.reporting import markdown_table, mean_std, plus_minus
from condlora.diffusion import Denoiser, sample
from condlora.image.build import build_data
from condlora.image.config import load_config
from condlora.image.strength import FitSettings, attach_schedule, fit_schedule
from condlora.lora.formats import base_modules_of, read_lora
from condlora.lora.schedule import StrengthSchedule

CONSTANTS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2)  # 0: the base model alone


@dataclass
class Bench:
    """What every LoRA is fitted and scored with."""

    base: Denoiser
    encoder: object
    judge: object
    cfg: DemoConfig
    train: tuple[Tensor, Tensor]  # the digits a schedule is fitted on (styled per subject)
    heldout: Tensor  # the held-out digits (styled per subject: the subject score's target)


def prepare(args: argparse.Namespace, cfg: DemoConfig, subjects: list[int]) -> tuple:
    """The demo's base model, judge, encoder and the zoo batches holding `subjects`."""
    base_cfg = load_config(find_config("digits-baseline.yaml"), args.overrides)
    check_out_dir(args.demo, cfg, base_cfg)
    clock = StageClock(args.demo / "stages.json")
    candidates = [args.base_run] if args.base_run else [QUICKSTART_BASE]
    base = base_model(base_cfg, args.demo, candidates, clock, False)
    (train_x, train_y), (hold_x, _) = build_data(base_cfg)
    judge = digits_judge(args.demo / "judge.safetensors", train_x, train_y, cfg, clock)
    encoder = subject_encoder(args.demo / "encoder.safetensors", train_x, cfg, clock)
    build_zoo(base, train_x, train_y, cfg, args.demo / "zoo", False, needed=set(subjects))
    return Bench(base, encoder, judge, cfg, (train_x, train_y), hold_x)


def scheduled_copy(
    bench: Bench, folder: Path, bins: int, per_block: bool
) -> tuple[Denoiser, StrengthSchedule]:
    """A copy of the base model with the LoRA in `folder` under a schedule (all ones)."""
    denoiser = copy.deepcopy(bench.base)
    lora = read_lora(folder, base_modules_of(denoiser.net.net))
    return denoiser, attach_schedule(denoiser, lora, bins, per_block)


@contextmanager
def tables_per_group(schedule: StrengthSchedule, tables: Tensor, group: int) -> Iterator[None]:
    """Within the block, sample n of a batch reads the schedule tables[n // group]
    (tables (K, blocks, bins)): K schedules drawn in one batch."""
    parts = []
    for table in tables:
        part = StrengthSchedule(schedule.blocks, table.shape[-1])
        part.table.data.copy_(table)
        parts.append(part)

    def strength(t: Tensor | float) -> Tensor:
        each = torch.stack([part.strength(t) for part in parts])  # (K, batch, blocks)
        rows = torch.arange(each.shape[1])
        return each[rows // group, rows]

    schedule.strength = strength  # an instance attribute: shadows the method
    try:
        yield
    finally:
        del schedule.strength


@torch.no_grad()
def draw(
    denoiser: Denoiser,
    schedule: StrengthSchedule,
    tables: Tensor,
    cfg: DemoConfig,
    seed: int,
    resolution: int,
) -> Tensor:
    """(K, 10 * per_class, 1, R, R): digits 0..9 under each of the K schedule tables, all
    from the seed's starting noise (the same for every table)."""
    labels = digit_labels(cfg.samples_per_class)
    n, k = len(labels), len(tables)
    noise = torch.randn(
        (n, 1, resolution, resolution), generator=torch.Generator().manual_seed(seed)
    )
    shape = (n * k, 1, resolution, resolution)
    with tables_per_group(schedule, tables, n):
        x = sample(
            denoiser,
            shape,
            "heun",
            cfg.sample_steps,
            noise=noise.repeat(k, 1, 1, 1),
            class_labels=labels.repeat(k),
        )
    return x.clamp(-1, 1).reshape(k, n, 1, resolution, resolution)


def score(bench: Bench, samples: Tensor, target: Tensor) -> tuple[float, float]:
    """(subject score, class accuracy) of one subject's samples."""
    return (
        float(subject_scores(bench.encoder, samples, target)[0]),
        float(class_accuracies(bench.judge, samples)[0]),
    )


def run_lora(
    bench: Bench,
    subject: int,
    folder: Path,
    seed: int,
    settings: FitSettings,
    bins: int,
    per_block: bool = False,
) -> dict:
    """Fit one schedule; score it and every constant strength on the same noise."""
    cfg = bench.cfg
    style = make_subjects(cfg).styles[subject]
    images, labels = bench.train
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    pick = pick[: settings.batch * 8]  # the subject's styled training digits
    styled = apply_style(images[pick], style)
    target = bench.encoder.embed_sets(apply_style(bench.heldout, style)[None])
    denoiser, schedule = scheduled_copy(bench, folder, bins, per_block)
    start = time.perf_counter()
    log = fit_schedule(denoiser, schedule, styled, labels[pick], settings)
    seconds = time.perf_counter() - start
    table = schedule.table.detach().clone()
    tables = torch.stack([torch.full_like(table, c) for c in CONSTANTS] + [table])
    samples = draw(denoiser, schedule, tables, cfg, 1000 * seed + subject, images.shape[-1])
    scores = [score(bench, x[None], target) for x in samples]
    record = {"subject": subject, "seed": seed, "fit_seconds": seconds}
    record["constant"] = {str(c): s for c, s in zip(CONSTANTS, scores, strict=False)}
    record["learned"] = scores[-1]
    record["table"] = table.tolist()
    record["final_loss"] = log[-1] if log else None
    return record


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """y of the piecewise-linear curve through (xs, ys) (sorted by x) at x, clamped at the ends."""
    points = sorted(zip(xs, ys, strict=True))
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
    return points[-1][1]


def curve(records: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """{row: ([subject scores], [class accuracies])} over the records, rows the constant
    strengths and "learned"."""
    rows = {c: ([], []) for c in [*records[0]["constant"], "learned"]}
    for r in records:
        for row, (score_, acc) in [*r["constant"].items(), ("learned", r["learned"])]:
            rows[row][0].append(score_)
            rows[row][1].append(acc)
    return rows


def gain(records: list[dict]) -> float:
    """Class accuracy of the learned schedules minus the constant-strength curve's at their
    subject score (the curve through the mean points of the constant strengths)."""
    rows = curve(records)
    mean = {row: (sum(s) / len(s), sum(a) / len(a)) for row, (s, a) in rows.items()}
    consts = [mean[c] for c in records[0]["constant"]]
    at = interpolate([p[0] for p in consts], [p[1] for p in consts], mean["learned"][0])
    return mean["learned"][1] - at


def seed_gains(records: list[dict]) -> list[float]:
    """`gain` of each seed's records (mean over its LoRAs)."""
    seeds = sorted({r["seed"] for r in records})
    return [gain([r for r in records if r["seed"] == s]) for s in seeds]


def table_lines(records: list[dict], weight: float) -> list[str]:
    """The Markdown table: mean +- std over LoRAs x seeds of every row."""
    lines = []
    for row, (scores, accs) in curve(records).items():
        name = f"learned schedule (weight {weight:g})" if row == "learned" else f"strength {row}"
        score_ = plus_minus(*mean_std(scores), ".3f")
        acc = plus_minus(*(100 * v for v in mean_std(accs)), ".1f") + "%"
        lines.append([name, score_, acc])
    return markdown_table(["LoRA applied as", "subject score", "class accuracy"], lines)


def draw_tradeoff(ax: object, stats: dict, weight: float) -> None:
    """The constant strengths as a curve, the learned schedules as a star; std error bars."""
    consts = [row for row in stats if row != "learned"]
    xs = [stats[c][0][0] for c in consts]
    ys = [100 * stats[c][1][0] for c in consts]
    xerr = [stats[c][0][1] for c in consts]
    yerr = [100 * stats[c][1][1] for c in consts]
    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", capsize=3, label="constant strength")
    for c, x, y in zip(consts, xs, ys, strict=True):
        ax.annotate(c, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    (sx, ssd), (ay, asd) = stats["learned"]
    label = f"learned schedule (weight {weight:g})"
    ax.errorbar([sx], [100 * ay], xerr=[ssd], yerr=[100 * asd], marker="*", markersize=12,
                capsize=3, color="tab:red", label=label)  # fmt: skip
    ax.set_xlabel("subject score")
    ax.set_ylabel("class accuracy (%)")


def plot_tradeoff(records: list[dict], weight: float, path: Path) -> None:
    """Three panels: the trade-off (all strengths; zoomed on strengths >= 0.8), error bars
    the std over LoRAs x seeds; and the learned s(t), mean and std over the fits."""
    stats = {row: (mean_std(s), mean_std(a)) for row, (s, a) in curve(records).items()}
    fig = Figure(figsize=(13, 4.2), dpi=100)
    full, zoom, sched = fig.subplots(1, 3)
    draw_tradeoff(full, stats, weight)
    full.legend(fontsize=8, loc="lower left")
    draw_tradeoff(zoom, stats, weight)
    low = min(stats[c][0][0] for c in ("0.8", "learned") if c in stats)
    zoom.set_xlim(low - 0.05, 1.0)
    zoom.set_title("zoom: strengths 0.8 and up", fontsize=9)
    tables = torch.tensor([r["table"] for r in records])  # (fits, blocks, bins)
    knots = torch.linspace(0, 1, tables.shape[-1])
    for b in range(tables.shape[1]):
        mean, std = tables[:, b].mean(0), tables[:, b].std(0) if len(tables) > 1 else 0 * knots
        sched.errorbar(knots.numpy(), mean.numpy(), yerr=std.numpy(), capsize=3, marker=".")
    sched.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    sched.set_xlabel("noise level t (0 clean, 1 noisiest)")
    sched.set_ylabel("learned strength s(t) at the knots")
    fig.tight_layout()
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=Path("runs/synth-demo"), help="demo folder")
    p.add_argument("--out", type=Path, default=Path("runs/schedule-demo"), help="output folder")
    p.add_argument("--base-run", type=Path, help="a finished digits-baseline run to reuse")
    p.add_argument("--loras", type=int, default=12, help="held-out zoo LoRAs scored")
    p.add_argument("--val", type=int, default=4, help="training-zoo LoRAs for the weight")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--weights", default="1", help="preservation weights tried on --val")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--bins", type=int, default=8)
    p.add_argument("--blocks", action="store_true", help="one schedule per block of the net")
    p.add_argument("--training-sigmas", action="store_true", help="not the sampler grid")
    p.add_argument("--smoke", action="store_true", help="the tiny demo config (tests)")
    p.add_argument("overrides", nargs="*", help="key=value for the base model's config")
    return p.parse_args(argv)


def fitted(
    args: argparse.Namespace, bench: Bench, store: dict, subject: int, seed: int, w: float
) -> dict:
    """One LoRA's record at weight w and seed: from the store (runs.json) or run now."""
    key = f"{w:g}/{subject}/{seed}"
    if key not in store:
        settings = FitSettings(
            args.steps,
            args.lr,
            args.batch,
            w,
            seed,
            None if args.training_sigmas else bench.cfg.sample_steps,
        )
        folder = make_subjects(bench.cfg).folder(args.demo / "zoo", subject)
        store[key] = run_lora(bench, subject, folder, seed, settings, args.bins, args.blocks)
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out / "runs.json", json.dumps(store, indent=1))
    return store[key]


def main(argv: list[str] | None = None) -> None:
    """Prepare, choose the weight on the validation LoRAs, score the held-out ones, report."""
    args = parse_args(argv)
    cfg = tiny() if args.smoke else demo_configs(False)[0]
    subs = make_subjects(cfg)
    scored = list(subs.heldout)[: args.loras]
    val = list(subs.train)[: args.val]
    bench = prepare(args, cfg, scored + val)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = args.out / "runs.json"
    store = json.loads(runs.read_text()) if runs.is_file() else {}
    loaded = len(store)  # fits of an earlier run (same --out), reused
    weights = [float(x) for x in args.weights.split(",")]
    validation = {
        w: gain([fitted(args, bench, store, i, seeds[0], w) for i in val]) for w in weights
    }
    weight = max(weights, key=lambda w: validation[w])
    records = [fitted(args, bench, store, i, s, weight) for i in scored for s in seeds]
    report(args, records, weight, validation, (loaded, len(store)))


def report(
    args: argparse.Namespace, records: list[dict], weight: float, validation: dict, fits: tuple
) -> None:
    """table.md, tradeoff.png and results.json into --out; the table and a JSON line printed."""
    info = machine("cpu")
    gains = seed_gains(records)
    fit = mean_std(r["fit_seconds"] for r in records)
    lines = table_lines(records, weight)
    text = [
        f"# Learned strength schedules on the digits zoo ({len(records)} fits)",
        "",
        f"*{info['commit']}, {info['date']}, {info['cpu']}, {info['cores']} cores, "
        f"torch {info['torch']}.*",
        "",
        *lines,
        "",
        f"Weight {weight:g} chosen on the validation LoRAs (class-accuracy gain at equal "
        f"subject score: {', '.join(f'{w:g}: {g * 100:+.1f}' for w, g in validation.items())}).",
        f"Learned minus constant-strength class accuracy at equal subject score: "
        f"{plus_minus(*(100 * v for v in mean_std(gains)), '.1f')} points (mean ± std over "
        f"seeds). Fit: {plus_minus(*fit, '.1f')} s per schedule. runs.json held {fits[0]} fits "
        f"of an earlier run (reused), {fits[1]} now.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "table.md", "\n".join(text) + "\n")
    plot_tradeoff(records, weight, args.out / "tradeoff.png")
    results = {
        "weight": weight,
        "validation_gain": validation,
        "gain_per_seed": gains,
        "fit_seconds": fit,
        "fits_reused": fits[0],
        "table": lines,
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    write_text_atomic(args.out / "results.json", json.dumps({**info, **results}, indent=1))
    print("\n".join(text[-2:] + lines))
    print_json("schedule_demo", info | {"smoke": args.smoke}, results)


if __name__ == "__main__":
    main()
