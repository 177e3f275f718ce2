"""The experiment file of `condlora experiment`: a grid of configs x seeds at equal steps.

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

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from condlora.core.config import find_config, from_dict, read_text_file, yaml_problem
from condlora.core.errors import ConfigError
from condlora.core.paths import FOLDER_NAME
from condlora.evaluation.evaluate import FEATURES
from condlora.image.build import resolve_data
from condlora.image.config import Config, load_config


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


def load_experiment(
    path: str | Path,
    steps: int | None = None,
    seeds: list[int] | None = None,
    num: int | None = None,
) -> tuple[Experiment, list[Variant]]:
    """Read and check an experiment file; steps / seeds / num replace the file's values."""
    path = Path(path)
    try:
        data = yaml.safe_load(read_text_file(path, "experiment file")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {yaml_problem(err)}") from None
    exp = from_dict(Experiment, data)
    exp.file = str(path)
    exp.steps = exp.steps if steps is None else steps
    exp.seeds = exp.seeds if seeds is None else seeds
    exp.eval.num = exp.eval.num if num is None else num
    variants = [from_dict(Variant, v, f"variants[{i}]") for i, v in enumerate(exp.variants)]
    _check(exp, variants)
    for v in variants:
        v.config = str(find_config(v.config, first=(path.parent,)))
    return exp, variants


def _check(exp: Experiment, variants: list[Variant]) -> None:
    if not FOLDER_NAME.match(exp.name) or exp.name in (".", ".."):
        raise ConfigError(f"experiment name must be letters, digits, '_-.', got {exp.name!r}")
    if exp.steps < 1:
        raise ConfigError(f"experiment steps must be >= 1, got {exp.steps}")
    if not exp.seeds or len(set(exp.seeds)) != len(exp.seeds) or min(exp.seeds) < 0:
        raise ConfigError(
            f"experiment seeds must be a non-empty list of distinct seeds >= 0: {exp.seeds}"
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
        if not FOLDER_NAME.match(v.name) or v.name in (".", "..") or names.count(v.name) > 1:
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
