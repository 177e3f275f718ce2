"""`condlora experiment FILE.yaml`: a grid of configs x seeds at equal steps, scored and reported.

The experiment file::

    name: digits-paper            # default output folder: runs/<name>
    steps: 500                    # training steps of every run (also the lr horizon)
    seeds: [0, 1, 2]              # train.seed of each run
    overrides: [train.warmup_steps=100]   # key=value for every variant (optional)
    eval: {num: 2000, feature: digits, every: 125, curve_num: 500}   # see EvalSpec
    variants:
      - name: baseline
        config: ../digits-baseline.yaml   # relative to this file, the cwd or the repository
        overrides: [net.cond_mode=both]   # key=value, as on the train command line

Every run trains in `<out>/<variant>/seed-<k>/` (a normal run folder) and is evaluated with
`condlora.evaluation.evaluate` against one shared judge (classifier and real statistics cached in
`<out>`). With eval.every > 0 the trainer also checkpoints every `every` steps, and at each
of those saves and at the end the EMA model is scored on `curve_num` samples (`curve.jsonl`):
the metric-vs-step curve. A rerun reuses finished runs and evaluations and resumes partial runs.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from condlora.conditioning.build import build_denoiser, resolve_data
from condlora.conditioning.config import Config, load_config
from condlora.conditioning.generate import generate, labels_for
from condlora.conditioning.param_counts import parameter_summary
from condlora.core.config import from_dict
from condlora.core.errors import CondloraError, ConfigError
from condlora.diffusion import Denoiser
from condlora.evaluation.evaluate import (
    DIGITS_MIN_SAMPLES,
    FEATURES,
    METRICS_FILE,
    Judge,
    evaluate_run,
    make_judge,
    score,
)
from condlora.train.checkpoint import CHECKPOINT_NAME, checkpoint_step
from condlora.train.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parents[3]
CURVE_FILE = "curve.jsonl"
RUN_FILE = "experiment-run.json"  # per run: variant, seed, accumulated training seconds
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class EvalSpec:
    num: int = 2000  # samples per final evaluation
    feature: str = "digits"  # "digits" | "inception"
    inception_weights: str | None = None  # FID Inception weights (feature: inception)
    seed: int = 0  # sampling seed
    steps: int | None = None  # sampling steps (None: each config's)
    sampler: str | None = None  # "heun" | "ddim" | "ddpm" (None: each config's)
    every: int = 0  # training steps between metric-vs-step points (0: final step only)
    curve_num: int = 500  # samples per metric-vs-step point


@dataclass
class Variant:
    name: str = ""  # folder name and report label
    config: str = ""  # YAML config: relative to the experiment file, the cwd or the repository
    overrides: list[str] = field(default_factory=list)  # key=value on top of the config


@dataclass
class Experiment:
    name: str = ""  # default output folder runs/<name>
    description: str = ""  # one paragraph for the report
    steps: int = 0  # training steps of every run
    seeds: list[int] = field(default_factory=lambda: [0])  # train.seed values
    overrides: list[str] = field(default_factory=list)  # key=value applied to every variant
    eval: EvalSpec = field(default_factory=EvalSpec)
    variants: list[dict] = field(default_factory=list)  # Variant mappings
    file: str = ""  # where it was read from (set by load_experiment)


def _find_config(raw: str, base: Path) -> Path:
    for folder in (base, Path.cwd(), REPO_ROOT):
        if (folder / raw).is_file():
            return (folder / raw).resolve()
    raise ConfigError(f"variant config '{raw}' not found next to {base}, in the cwd or the repo")


def load_experiment(
    path: str | Path,
    steps: int | None = None,
    seeds: list[int] | None = None,
    num: int | None = None,
) -> tuple[Experiment, list[Variant]]:
    """Read and check an experiment file; steps / seeds / num replace the file's values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    exp = from_dict(Experiment, data)
    exp.file = str(path)
    exp.steps = steps or exp.steps
    exp.seeds = seeds or exp.seeds
    exp.eval.num = num or exp.eval.num
    variants = [from_dict(Variant, v, f"variants[{i}]") for i, v in enumerate(exp.variants)]
    _check(exp, variants)
    for v in variants:
        v.config = str(_find_config(v.config, path.parent))
    return exp, variants


def _check(exp: Experiment, variants: list[Variant]) -> None:
    if not NAME.match(exp.name):
        raise ConfigError(f"experiment name must be letters, digits, '_-.', got {exp.name!r}")
    if exp.steps < 1:
        raise ConfigError(f"experiment steps must be >= 1, got {exp.steps}")
    if not exp.seeds or len(set(exp.seeds)) != len(exp.seeds):
        raise ConfigError(
            f"experiment seeds must be a non-empty list of distinct seeds: {exp.seeds}"
        )
    e = exp.eval
    if e.feature not in FEATURES:
        raise ConfigError(f"eval.feature must be one of {', '.join(FEATURES)}, got {e.feature!r}")
    if e.num < 2 or e.curve_num < 2 or e.every < 0:
        raise ConfigError("eval.num and eval.curve_num must be >= 2, eval.every >= 0")
    if not variants:
        raise ConfigError("an experiment needs at least one variant")
    names = [v.name for v in variants]
    for v in variants:
        if not NAME.match(v.name) or names.count(v.name) > 1:
            raise ConfigError(f"variant names must be unique folder names, got {v.name!r}")
        if not v.config:
            raise ConfigError(f"variant {v.name} needs a config")


def run_config(exp: Experiment, variant: Variant, seed: int) -> Config:
    """The config of one run: the variant's config + overrides + seed, steps and checkpoints."""
    extra = [
        f"name={exp.name}-{variant.name}-seed{seed}",
        f"train.seed={seed}",
        f"train.max_steps={exp.steps}",
    ]
    if exp.eval.every:
        extra.append(f"train.ckpt_every={exp.eval.every}")
    overrides = [*exp.overrides, *variant.overrides, *extra]
    return resolve_data(load_config(variant.config, overrides))


class CurveTrainer(Trainer):
    """A Trainer that scores its EMA model at its saves on multiples of `every` and at the end."""

    def __init__(
        self, cfg: Config, out_dir: Path, resume: bool, spec: EvalSpec, judge: Judge
    ) -> None:
        super().__init__(cfg, out_dir, resume=resume)
        self.spec, self.judge = spec, judge

    def save(self) -> None:
        """Checkpoint, then (main process, on `every` or the end) append a point to curve.jsonl."""
        super().save()
        every, end = self.spec.every, self.cfg.train.max_steps
        on_time = every and (self.step % every == 0 or self.step == end)
        if on_time and self.acc.is_main_process:
            point = curve_point(self.ema.model, self.cfg, self.spec, self.judge)
            with open(self.out / CURVE_FILE, "a") as f:
                f.write(json.dumps({"step": self.step, **point}) + "\n")


def curve_point(denoiser: Denoiser, cfg: Config, spec: EvalSpec, judge: Judge) -> dict:
    """FD, KID and class accuracy of `spec.curve_num` samples (one metric-vs-step point)."""
    labels = labels_for(cfg, spec.curve_num)
    n, seed = spec.curve_num, spec.seed
    samples = generate(denoiser, cfg, n, labels, steps=spec.steps, sampler=spec.sampler, seed=seed)
    m = score(judge, samples, labels, seed=spec.seed)
    keys = ("fd", "kid_mean", "kid_std", "class_accuracy", "num_samples", "fd_floor_at_eval_sizes")
    return {k: m[k] for k in keys}


def _check_run_folder(run_dir: Path, cfg: Config) -> int:
    """Step of the run's checkpoint (0: none); an error if the folder holds another config."""
    ckpt = run_dir / CHECKPOINT_NAME
    if not ckpt.is_file():
        for stale in (CURVE_FILE, "metrics.jsonl", METRICS_FILE):  # logs of a run never saved
            (run_dir / stale).unlink(missing_ok=True)
        return 0
    saved = load_config(run_dir / "config.yaml")
    if saved != cfg:
        raise CondloraError(
            f"{run_dir} holds a run of a different config (steps, seed or overrides changed): "
            "delete it or pass another --out"
        )
    return checkpoint_step(ckpt)


def _eval_is_current(run_dir: Path, spec: EvalSpec, step: int) -> dict | None:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
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
    done = _check_run_folder(run_dir, cfg)
    record_path = run_dir / RUN_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record |= {"variant": variant.name, "seed": seed, "run": str(run_dir)}
    if done < exp.steps:
        start = time.time()
        CurveTrainer(cfg, run_dir, resume=done > 0, spec=exp.eval, judge=judge).run(progress)
        record["train_seconds"] = record.get("train_seconds", 0.0) + time.time() - start
        record_path.write_text(json.dumps(record, indent=2) + "\n")
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
    from condlora.evaluation.report import write_report  # matplotlib only when a report is written

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
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return write_report(exp, summary, out)
