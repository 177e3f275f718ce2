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

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from condlora.core.config import (
    NON_NEGATIVE,
    SEED,
    Checked,
    Each,
    OneOf,
    Range,
    find_config,
    from_dict,
    read_text_file,
    yaml_problem,
)
from condlora.core.errors import ConfigError
from condlora.core.files import FOLDER_NAME
from condlora.evaluation.evaluate import FEATURES
from condlora.image.config import Config, load_config


@dataclass
class EvalSpec(Checked):
    num: int = 2000  # samples per final evaluation
    feature: str = "digits"  # "digits" | "inception"
    inception_weights: str | None = None  # FID Inception weights (feature: inception)
    seed: int = 0  # sampling seed
    steps: int | None = None  # sampling steps (None: each config's)
    sampler: str | None = None  # "heun" | "ddim" | "ddpm" (None: each config's)
    every: int = 0  # training steps between metric-vs-step points (0: final step only)
    curve_num: int = 500  # samples per metric-vs-step point

    CHECKS: ClassVar[dict] = {
        "num": Range(2, 10**8),
        "feature": OneOf(FEATURES),
        "seed": SEED,
        "steps": Range(1, 100_000),
        "every": NON_NEGATIVE,
        "curve_num": Range(2, 10**8),
    }


@dataclass
class Variant(Checked):
    name: str = ""  # folder name and report label
    config: str = ""  # YAML config: relative to the experiment file, the cwd or the repository
    overrides: list[str] = field(default_factory=list)  # key=value on top of the config

    def check(self, key: Callable[[str], str]) -> None:
        """A folder name and a config."""
        if not _folder_name(self.name):
            raise ConfigError(f"variant names must be unique folder names, got {self.name!r}")
        if not self.config:
            raise ConfigError(f"variant {self.name} needs a config")


@dataclass
class Experiment(Checked):
    name: str = ""  # default output folder runs/<name>
    description: str = ""  # one paragraph for the report
    steps: int = 0  # training steps of every run
    seeds: list[int] = field(default_factory=lambda: [0])  # train.seed values
    overrides: list[str] = field(default_factory=list)  # key=value applied to every variant
    eval: EvalSpec = field(default_factory=EvalSpec)
    variants: list[dict] = field(default_factory=list)  # Variant mappings
    file: str = ""  # where it was read from (set by load_experiment)

    CHECKS: ClassVar[dict] = {"steps": Range(1, 10**9), "seeds": Each(SEED)}

    def check(self, key: Callable[[str], str]) -> None:
        """A folder name, distinct seeds."""
        if not _folder_name(self.name):
            raise ConfigError(f"experiment name must be letters, digits, '_-.', got {self.name!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"experiment seeds must be distinct, got {self.seeds}")


def _folder_name(name: str) -> bool:
    return bool(FOLDER_NAME.match(name)) and name not in (".", "..")


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
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of experiment keys, got {data!r}")
    given = {"steps": steps, "seeds": seeds, "file": str(path)}
    data = {**data, **{k: v for k, v in given.items() if v is not None}}
    if num is not None:
        data["eval"] = {**(data.get("eval") or {}), "num": num}
    exp = from_dict(Experiment, data)
    variants = [from_dict(Variant, v, f"variants[{i}]") for i, v in enumerate(exp.variants)]
    names = [v.name for v in variants]
    if not variants:
        raise ConfigError("an experiment needs at least one variant")
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names must be unique folder names, got {names}")
    for v in variants:
        v.config = str(find_config(v.config, first=(path.parent,)))
    return exp, variants


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
    return load_config(variant.config, overrides)
