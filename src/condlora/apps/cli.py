"""The applications' commands: `condlora experiment`, `quickstart` and `synth demo`.

`condlora serve` registers itself (`apps.serve.server`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from condlora.core.errors import CondloraError

# Imports of torch-heavy modules happen inside the commands, so `condlora --help` is quick.


def _quickstart(args: argparse.Namespace) -> None:
    from condlora.apps.quickstart import run_quickstart

    if args.steps is not None and args.steps < 1:
        raise CondloraError(f"--steps must be >= 1, got {args.steps}")
    if args.workers < 1:
        raise CondloraError(f"--workers must be >= 1, got {args.workers}")
    report = run_quickstart(Path(args.out), steps=args.steps, workers=args.workers)
    print(f"report: {report}")


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CondloraError(f"--seeds must be comma-separated integers, got '{text}'") from None
    if not seeds or min(seeds) < 0:
        raise CondloraError(f"--seeds must be integers >= 0, at least one, got '{text}'")
    return seeds


def _experiment(args: argparse.Namespace) -> None:
    from condlora.apps.experiment.runner import run_experiment
    from condlora.apps.experiment.spec import load_experiment

    seeds = _seed_list(args.seeds) if args.seeds is not None else None
    if args.steps is not None and args.steps < 1:
        raise CondloraError(f"--steps must be >= 1, got {args.steps}")
    if args.num is not None and args.num < 2:
        raise CondloraError(f"--num must be >= 2, got {args.num}")
    exp, variants = load_experiment(args.file, steps=args.steps, seeds=seeds, num=args.num)
    out = Path(args.out) if args.out else Path("runs") / exp.name
    report = run_experiment(exp, variants, out, progress=not args.quiet)
    print(f"report: {report}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the experiment and quickstart subcommands."""
    p = sub.add_parser(
        "experiment", help="train and evaluate a grid of configs x seeds, with a report"
    )
    p.add_argument("file", help="experiment YAML (see configs/experiments/)")
    p.add_argument("--out", help="output folder (default: runs/<experiment name>)")
    p.add_argument("--steps", type=int, help="training steps per run (replaces the file's)")
    p.add_argument("--seeds", help="comma-separated seeds (replaces the file's), e.g. 0,1")
    p.add_argument("--num", type=int, help="evaluation samples per run (replaces the file's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_experiment)

    p = sub.add_parser(
        "quickstart", help="baseline vs UC-LoRA on the embedded digits, with a report"
    )
    p.add_argument("--out", default="runs/quickstart", help="output folder")
    p.add_argument("--steps", type=int, help="training steps per model (default: the configs')")
    p.add_argument(
        "--workers", type=int, default=2, help="models trained side by side, one thread each"
    )
    p.set_defaults(func=_quickstart)


def _demo(args: argparse.Namespace) -> None:
    from condlora.apps.synthesis_demo.run import default_out, demo_configs, run_demo

    cfg, base_cfg = demo_configs(args.quick, args.setting, args.split, args.redraw_zoo)
    out = args.out or default_out(args.quick, args.setting, args.split, args.redraw_zoo)
    if args.workers < 1:
        raise CondloraError(f"--workers must be >= 1, got {args.workers}")
    report = run_demo(out, cfg, base_cfg, workers=args.workers)
    print(f"wrote {report}")


def add_synth_demo(synth_sub: argparse._SubParsersAction) -> None:
    """Add `condlora synth demo` to the synth command group."""
    p = synth_sub.add_parser(
        "demo", help="embedded end-to-end demo: a zoo of handwriting-style LoRAs on the digits"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (runs/synth-demo, -quick, -unseen-corner and -val as chosen)",
    )
    p.add_argument(
        "--setting",
        choices=("box", "unseen-corner"),
        default="box",
        help="box: scored styles from the training box (default); unseen-corner: scored "
        "styles all bold and right-leaning, a combination no training subject has",
    )
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="the subjects scored: test (the report, default) or val (to choose settings on)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smaller zoo (60 training, 8 validation, 12 test subjects) for a first look",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="generative models trained side by side, one thread each (default 2)",
    )
    p.add_argument(
        "--redraw-zoo",
        action="store_true",
        help="every seed fine-tunes its own zoo (own LoRA init and noise draws) instead of "
        "sharing one: the zoo's time times the seeds",
    )
    p.set_defaults(func=_demo)
