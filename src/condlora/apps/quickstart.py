"""`condlora quickstart`: scale-and-shift baseline vs UC-LoRA on the embedded digits.

Trains both models, samples class-conditional digits, and judges them with a
small classifier trained on the real training digits: the fraction of samples
classified as the requested class, and the Frechet distance of their features to
the held-out real digits, next to the same distance for real training digits
(the floor a perfect model would reach at these set sizes).

The two models train and sample side by side, one thread each, in worker processes
(`workers`): nets this small use two cores poorly from one process; the judge trains in
the first worker that is free. Each stage shows a progress bar with its ETA; the sample
grids are the first evaluation samples of each class, so nothing is sampled twice.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from condlora.core.config import find_config
from condlora.core.files import write_text_atomic
from condlora.core.images import save_grid
from condlora.core.reporting import provenance_line
from condlora.evaluation.evaluate import digits_classifier
from condlora.image.build import build_data
from condlora.image.checks import parameter_summary
from condlora.image.config import Config, load_config
from condlora.image.generate import generate, labels_for
from condlora.image.task import load_run, saved_step, train_or_reuse
from condlora.metrics import digits_metrics

MODELS = {"baseline": "digits-baseline.yaml", "uclora": "digits-uclora.yaml"}
EVAL_SAMPLES = 1500  # as many as real training digits, so the real-to-real floor matches
SAMPLE_SEED = 1
GRID_PER_CLASS = 10  # a 10 x 10 grid, one row per class


@dataclass
class ModelJob:
    """One model's share of the quickstart: what a worker process needs to run it."""

    name: str  # "baseline" / "uclora": the run folder's name and the report's row
    config_file: str  # a config of configs/ (the report names it)
    cfg: Config  # that config with the overrides, loaded (and checked) once
    out: Path  # the quickstart folder
    num: int  # evaluation samples
    bar_line: int  # the terminal line of its progress bars (0: none shown)


def train_and_sample(job: ModelJob) -> dict:
    """Train the model (or reuse its finished run), then sample `num` class-conditional
    digits with its EMA weights: the report's row, with `samples` and `labels`."""
    cfg = job.cfg

    def bar(stage: str) -> bool | dict:
        if not job.bar_line:
            return False
        return {"desc": f"{job.name}: {stage}", "position": job.bar_line - 1, "leave": True}

    # no grids of the run: the report's come from the evaluation samples
    seconds = train_or_reuse(cfg, job.out / job.name, progress=bar("training"), grids=False)
    cfg, denoiser, _ = load_run(job.out / job.name)
    labels = labels_for(cfg, job.num)
    start = time.time()
    samples = generate(denoiser, cfg, job.num, labels, seed=SAMPLE_SEED, progress=bar("sampling"))
    return {
        "name": job.name,
        "config": job.config_file,
        "steps": cfg.train.max_steps,
        "train_seconds": seconds,
        "sample_seconds": time.time() - start,
        "parameters": parameter_summary(denoiser),
        "samples": samples,
        "labels": labels,
    }


def train_judge(out: Path, progress: bool | dict) -> None:
    """The digits classifier that judges the samples, trained (seeded) once and cached in
    `out`."""
    digits_classifier(load_config(find_config(MODELS["baseline"])), out, progress=progress)


def _one_thread(fn: Callable, *args: object) -> object:
    """A worker's call: one thread, so the workers share the cores without contention."""
    torch.set_num_threads(1)
    return fn(*args)


def run_parallel(calls: list[tuple[Callable, tuple]], workers: int) -> list:
    """Each call's result in order, `workers` processes at a time (1: here, one by one).

    A pool of two takes the first two calls at once and the next as soon as one is done."""
    if workers <= 1:
        return [fn(*args) for fn, args in calls]
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(min(workers, len(calls)), mp_context=context) as pool:
        futures = [pool.submit(_one_thread, fn, *args) for fn, args in calls]
        return [future.result() for future in futures]


def run_quickstart(
    out: Path,
    steps: int | None = None,
    overrides: list[str] = (),
    num: int = EVAL_SAMPLES,
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """Train, sample and evaluate both models; write `report.md` in `out`; return its path.

    steps replaces the configs' training steps, overrides are key=value for both configs (a
    tiny net in the tests), num is the number of samples scored per model, workers the
    processes that train side by side (UC-LoRA, the longest, first; the judge in the first
    free worker).
    """
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*overrides, *([f"train.max_steps={steps}"] if steps else [])]
    # a bad override or a folder of another config: refused here, before any work
    jobs = []
    for i, (name, file) in enumerate(MODELS.items()):
        cfg = load_config(find_config(file), overrides)
        saved_step(out / name, cfg)
        jobs.append(ModelJob(name, file, cfg, out, num, bar_line=i + 1 if progress else 0))
    print(f"[quickstart] training and sampling {', '.join(MODELS)} ({workers} at a time)")
    judge_bar = {"position": len(jobs), "leave": True} if progress else False
    calls = [(train_and_sample, (job,)) for job in reversed(jobs)]  # the longest first
    *rows, _ = run_parallel([*calls, (train_judge, (out, judge_bar))], workers)
    rows.reverse()  # in the order of MODELS
    cfg = load_config(find_config(MODELS["baseline"]))
    classifier = digits_classifier(cfg, out)  # trained above: read from `out`
    (train_x, _), (hold_x, _) = build_data(cfg)
    floor = digits_metrics(classifier, train_x[:num], None, hold_x)["frechet_distance"]
    for row in rows:
        samples, labels = row.pop("samples"), row.pop("labels")
        row.update(digits_metrics(classifier, samples, labels, hold_x))
        grid, per_class = class_grid(samples, labels)
        save_grid(grid, out / f"{row['name']}.png", nrow=per_class)
    report = out / "report.md"
    write_text_atomic(report, render_report(rows, floor, len(hold_x), num, time.time() - start))
    return report


def class_grid(samples: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The first samples of each class, one row per class (classes in order), and the row
    length: up to GRID_PER_CLASS, as many as every class has."""
    classes = torch.unique(labels)
    per_class = min(GRID_PER_CLASS, *((labels == c).sum().item() for c in classes))
    rows = [samples[labels == c][:per_class] for c in classes]
    return torch.cat(rows), per_class


def render_report(
    rows: list[dict], floor: float, n_holdout: int, num: int, seconds: float | None = None
) -> str:
    """The Markdown report: a table of both models and their sample grids."""
    lines = [
        "# condlora quickstart: scale-and-shift baseline vs UC-LoRA on digits",
        "",
        provenance_line(),
        "",
        f"Evaluation: {num} class-conditional samples per model ({num // 10} per class), "
        f"judged by a CNN trained on the real training digits. Frechet distance (FD) on its "
        f"128-d features against the {n_holdout} held-out real digits; the real-to-real floor "
        f"(real training digits against the same held-out set, same sizes) is **{floor:.2f}**.",
        "",
        "| model | parameters | LoRA parameters | steps | train time (s) | class accuracy "
        "| FD | FD / real-to-real |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        p = r["parameters"]
        lines.append(
            f"| {r['name']} | {p['parameters']:,} | {p['lora parameters']:,} | {r['steps']} "
            f"| {r['train_seconds']:.0f} | {r['class_accuracy']:.1%} | {r['frechet_distance']:.2f} "
            f"| {r['frechet_distance'] / floor:.2f} |"
        )
    lines += ["", "Train time 0 means the run was already trained and was reused."]
    if seconds is not None:
        lines.append(f"The quickstart took {seconds:.0f} s in all (the models side by side).")
    lines.append("")
    for r in rows:
        lines += [f"## {r['name']} ({r['config']})", "", f"![{r['name']}]({r['name']}.png)", ""]
        lines.append("One row per class, 0 to 9: the first evaluation samples, EMA weights.")
        lines.append("")
    return "\n".join(lines)
