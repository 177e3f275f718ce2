"""`condlora eval`: score a run's samples."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Imports of torch-heavy modules happen inside the commands, so `condlora --help` is quick.


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


def register(sub: argparse._SubParsersAction) -> None:
    """Add the eval subcommand."""
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
