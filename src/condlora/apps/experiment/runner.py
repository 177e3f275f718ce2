"""`condlora experiment FILE.yaml`: train and evaluate a grid of configs x seeds, then report.

The file format is in `condlora.apps.experiment.spec`. Every run trains in
`<out>/<variant>/seed-<k>/` (a normal run folder) and is evaluated against one shared judge
(classifier and real statistics cached in `<out>`); with eval.every > 0 its EMA model is
also scored at every `every`-step checkpoint (`curve.jsonl`). A rerun reuses finished runs
and evaluations and resumes partial runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from condlora.apps.experiment.report import write_report
from condlora.apps.experiment.spec import EvalSpec, Experiment, Variant, run_config
from condlora.core.files import append_jsonl, read_json_record, truncate_jsonl, write_text_atomic
from condlora.diffusion import Denoiser
from condlora.evaluation.evaluate import (
    DIGITS_MIN_SAMPLES,
    METRICS_FILE,
    Judge,
    evaluate_run,
    make_judge,
    score,
)
from condlora.image.build import build_denoiser
from condlora.image.checks import parameter_summary
from condlora.image.config import Config
from condlora.image.generate import generate, labels_for
from condlora.image.task import saved_step, train_or_reuse
from condlora.train.loop import Callback, Trainer

CURVE_FILE = "curve.jsonl"
RUN_FILE = "experiment-run.json"  # per run: variant, seed, accumulated training seconds


class CurvePoints(Callback):
    """Scores the EMA model at the saves on multiples of `every` and at the end (curve.jsonl)."""

    def __init__(self, spec: EvalSpec, judge: Judge) -> None:
        self.spec, self.judge = spec, judge

    def on_start(self, trainer: Trainer) -> None:
        """Drop points past the checkpoint the run resumes from (they will be redone)."""
        if trainer.acc.is_main_process:
            truncate_jsonl(trainer.out / CURVE_FILE, trainer.step)

    def after_save(self, trainer: Trainer) -> None:
        """On `every` or the end (main process): append a point to curve.jsonl."""
        every, end = self.spec.every, trainer.train_cfg.max_steps
        on_time = every and (trainer.step % every == 0 or trainer.step == end)
        if on_time and trainer.acc.is_main_process:
            point = curve_point(trainer.ema.model, trainer.cfg, self.spec, self.judge)
            append_jsonl(trainer.out / CURVE_FILE, {"step": trainer.step, **point})


def curve_point(denoiser: Denoiser, cfg: Config, spec: EvalSpec, judge: Judge) -> dict:
    """FD, KID and class accuracy of `spec.curve_num` samples (one metric-vs-step point)."""
    labels = labels_for(cfg, spec.curve_num)
    n, seed = spec.curve_num, spec.seed
    samples = generate(denoiser, cfg, n, labels, steps=spec.steps, sampler=spec.sampler, seed=seed)
    m = score(judge, samples, labels, seed=spec.seed)
    keys = ("fd", "kid_mean", "kid_std", "class_accuracy", "num_samples", "fd_floor_at_eval_sizes")
    return {k: m[k] for k in keys}


def _eval_is_current(run_dir: Path, spec: EvalSpec, step: int) -> dict | None:
    m = read_json_record(run_dir / METRICS_FILE)
    if m is None:
        return None
    wanted = {"step": step, "num_samples": spec.num, "feature": spec.feature, "seed": spec.seed}
    wanted |= {"sampler": spec.sampler} if spec.sampler else {}
    wanted |= {"steps": spec.steps} if spec.steps else {}
    return m if all(m.get(k) == v for k, v in wanted.items()) else None


def train_and_evaluate(
    exp: Experiment, variant: Variant, seed: int, out: Path, judge: Judge, progress: bool = True
) -> dict:
    """One run: train (or resume, or reuse) to exp.steps, then evaluate (or reuse metrics.json)."""
    cfg = run_config(exp, variant, seed)
    run_dir = out / variant.name / f"seed-{seed}"
    done = saved_step(run_dir, cfg)
    if done == 0:  # the evaluation of a run that was never saved is stale
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    record_path = run_dir / RUN_FILE
    saved = read_json_record(record_path)  # None: missing, or damaged (then made again)
    record = (saved or {}) | {"variant": variant.name, "seed": seed, "run": str(run_dir)}
    if done < exp.steps:
        seconds = train_or_reuse(cfg, run_dir, progress, [CurvePoints(exp.eval, judge)])
        record["train_seconds"] = record.get("train_seconds", 0.0) + seconds
    if done < exp.steps or (saved is None and done > 0):
        write_text_atomic(record_path, json.dumps(record, indent=2) + "\n", sync=True)
    metrics = _eval_is_current(run_dir, exp.eval, exp.steps)
    record["reused_eval"] = metrics is not None
    if metrics is None:
        e = exp.eval
        metrics = evaluate_run(
            run_dir, e.num, e.feature, seed=e.seed, steps=e.steps, sampler=e.sampler, judge=judge
        )
    record["trained_now"] = done < exp.steps
    return record | {"metrics": metrics}


def judge_for(cfg: Config, spec: EvalSpec, out: Path, judges: dict) -> Judge:
    """One judge per data set (classifier and real statistics cached in `out`)."""
    d = cfg.data
    key = (d.name, d.path, d.resolution, d.channels, d.holdout, d.split_seed)
    if key not in judges:
        judges[key] = make_judge(cfg, spec.feature, out, spec.inception_weights)
    return judges[key]


def run_experiment(
    exp: Experiment, variants: list[Variant], out: str | Path, progress: bool = True
) -> Path:
    """Train and evaluate every variant x seed in `out`, then write `out/report.md`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = {v.name: run_config(exp, v, exp.seeds[0]) for v in variants}
    for v in variants:  # fail on a bad config before hours of training
        build_denoiser(configs[v.name])
    digits = any(c.data.name == "digits" for c in configs.values())
    if digits and exp.eval.num < DIGITS_MIN_SAMPLES:
        print(
            f"warning: eval.num {exp.eval.num} is below {DIGITS_MIN_SAMPLES}: FD on few samples "
            "is noisy and biased upwards (fine for a quick look)"
        )
    judges: dict = {}
    results: dict[str, list[dict]] = {v.name: [] for v in variants}
    total = len(variants) * len(exp.seeds)
    for i, (v, seed) in enumerate(((v, s) for v in variants for s in exp.seeds), start=1):
        tag = f"[{i}/{total}] {v.name} seed {seed}"
        print(f"{tag}: {exp.steps} steps", flush=True)
        judge = judge_for(configs[v.name], exp.eval, out, judges)
        r = train_and_evaluate(exp, v, seed, out, judge, progress)
        m = r["metrics"]
        acc = "" if m["class_accuracy"] is None else f", class accuracy {m['class_accuracy']:.1%}"
        how = "reused" if not r["trained_now"] else f"trained in {r['train_seconds']:.0f} s"
        print(
            f"{tag}: FD {m['fd']:.3f} (floor ~{m['fd_floor_at_eval_sizes']:.3f}), "
            f"KID {m['kid_mean']:.5f}{acc}; {how}, eval {m['eval_seconds']:.0f} s"
            f"{' (reused)' if r['reused_eval'] else ''}",
            flush=True,
        )
        results[v.name].append(r)
    summary = [
        {
            "variant": dataclasses.asdict(v),
            "parameters": parameter_summary(build_denoiser(configs[v.name])),
            "runs": results[v.name],
        }
        for v in variants
    ]
    write_text_atomic(out / "results.json", json.dumps(summary, indent=2) + "\n")
    return write_report(exp, summary, out)
