"""The `condlora` command: argument parsing only; the work lives in the library."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from condlora.core.errors import CondloraError

# Imports of torch-heavy modules happen inside the commands, so `condlora --help` is quick.


def _train(args: argparse.Namespace) -> None:
    from condlora.conditioning.config import load_config
    from condlora.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    train(cfg, out, resume=args.resume, max_steps=args.max_steps, progress=not args.quiet)
    print(f"run folder: {out}")


def _sample(args: argparse.Namespace) -> None:
    from condlora.conditioning.generate import generate, labels_for, load_run
    from condlora.core.images import save_grid

    if args.num < 1:
        raise CondloraError(f"--num must be at least 1, got {args.num}")
    cfg, denoiser, step = load_run(args.run)
    if args.guidance is not None:
        diffusion = dataclasses.replace(cfg.diffusion, guidance=args.guidance)
        cfg = dataclasses.replace(cfg, diffusion=diffusion)
    labels = labels_for(cfg, args.num, args.label)
    images = generate(
        denoiser,
        cfg,
        args.num,
        labels,
        steps=args.steps,
        sampler=args.sampler,
        seed=args.seed,
        progress=True,
    )
    path = save_grid(images, args.out, nrow=args.nrow)
    print(f"wrote {args.num} samples (step {step}) to {path}")


def _info(args: argparse.Namespace) -> None:
    from condlora.conditioning.build import build_denoiser
    from condlora.conditioning.config import load_config
    from condlora.conditioning.param_counts import parameter_summary

    cfg = load_config(args.config, args.overrides)
    for key, value in parameter_summary(build_denoiser(cfg)).items():
        print(f"{key}: {value}")


def _quickstart(args: argparse.Namespace) -> None:
    from condlora.evaluation.quickstart import run_quickstart

    report = run_quickstart(Path(args.out), steps=args.steps)
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
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CondloraError(f"--seeds must be comma-separated integers, got '{text}'") from None


def _experiment(args: argparse.Namespace) -> None:
    from condlora.evaluation.experiment import load_experiment, run_experiment

    seeds = _seed_list(args.seeds) if args.seeds else None
    exp, variants = load_experiment(args.file, steps=args.steps, seeds=seeds, num=args.num)
    out = Path(args.out) if args.out else Path("runs") / exp.name
    report = run_experiment(exp, variants, out, progress=not args.quiet)
    print(f"report: {report}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="condlora", description="Conditional LoRA for diffusion models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a diffusion model from a YAML config")
    p.add_argument("--config", required=True, help="YAML config (overrides on the defaults)")
    p.add_argument("--out", help="run folder (default: runs/<name>)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.lr=1e-3")
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="sample a PNG grid from a trained run (EMA weights)")
    p.add_argument("--run", required=True, help="run folder written by `condlora train`")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--out", required=True, help="output PNG file")
    p.add_argument("--label", type=int, help="class of every sample (default: cycle 0..K-1)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the config's)")
    p.add_argument(
        "--sampler", choices=["heun", "ddim", "ddpm", "iddpm"], help="default: the config's"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale (needs train.label_dropout)"
    )
    p.add_argument("--nrow", type=int, default=10, help="images per grid row")
    p.set_defaults(func=_sample)

    p = sub.add_parser("info", help="parameter counts of a config's network")
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. lora.rank=8")
    p.set_defaults(func=_info)

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
    p.set_defaults(func=_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one subcommand; a user mistake prints one line and exits 2."""
    parser = build_parser()
    # key=value overrides may stand anywhere, also after options: collect the leftovers
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        args.func(args)
    except CondloraError as err:
        print(f"condlora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("condlora: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
