"""`condlora eval`, `experiment` and `quickstart`: the evaluation commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from condlora.core.errors import CondloraError

# Imports of torch-heavy modules happen inside the commands, so `condlora --help` is quick.


def _quickstart(args: argparse.Namespace) -> None:
    from condlora.evaluation.quickstart import run_quickstart

    if args.steps is not None and args.steps < 1:
        raise CondloraError(f"--steps must be >= 1, got {args.steps}")
    if args.workers < 1:
        raise CondloraError(f"--workers must be >= 1, got {args.workers}")
    report = run_quickstart(Path(args.out), steps=args.steps, workers=args.workers)
    print(f"report: {report}")


def _eval(args: argparse.Namespace) -> None:
    from condlora.evaluation.evaluate import evaluate_run, summary_line

    metrics = evaluate_run(
        args.run,
        num=args.num,
        feature=args.feature,
        inception_weights=args.inception_weights,
        seed=args.seed,
        steps=args.steps,
        sampler=args.sampler,
        guidance=args.guidance,
        cache_dir=args.cache,
        progress=not args.quiet,
    )
    for note in metrics["warnings"]:
        print(f"condlora: warning: {note}", file=sys.stderr)
    print(summary_line(metrics))
    print(f"wrote {Path(args.run) / 'metrics.json'}")


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CondloraError(f"--seeds must be comma-separated integers, got '{text}'") from None
    if not seeds or min(seeds) < 0:
        raise CondloraError(f"--seeds must be integers >= 0, at least one, got '{text}'")
    return seeds


def _experiment(args: argparse.Namespace) -> None:
    from condlora.evaluation.experiment import run_experiment
    from condlora.evaluation.experiment_file import load_experiment

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
    """Add the eval, experiment and quickstart subcommands."""
    p = sub.add_parser(
        "eval", help="score a run's samples: FD, KID, class accuracy -> metrics.json"
    )
    p.add_argument("--run", required=True, help="run folder written by `condlora train`")
    p.add_argument("--num", type=int, help="samples (default: 2000 for digits, else 10000)")
    p.add_argument(
        "--feature",
        choices=["digits", "inception"],
        default="digits",
        help="feature network: the digits CNN (default) or the FID Inception-v3",
    )
    p.add_argument("--inception-weights", help="FID Inception weights (--feature inception)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--steps", type=int, help="sampling steps (default: the config's)")
    p.add_argument(
        "--sampler", choices=["heun", "ddim", "ddpm", "iddpm"], help="default: the config's"
    )
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument(
        "--cache", help="folder of the cached classifier and real statistics (default: --run)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval)

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
