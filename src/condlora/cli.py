"""The `condlora` command: argument parsing only; the work lives in the library."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from condlora.errors import CondloraError

# Imports of torch-heavy modules happen inside the commands, so `condlora --help` is quick.


def _train(args: argparse.Namespace) -> None:
    from condlora.config import load_config
    from condlora.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    train(cfg, out, resume=args.resume, max_steps=args.max_steps, progress=not args.quiet)
    print(f"run folder: {out}")


def _sample(args: argparse.Namespace) -> None:
    from condlora.generate import generate, labels_for, load_run
    from condlora.images import save_grid

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
    from condlora.build import build_denoiser
    from condlora.config import load_config
    from condlora.params import parameter_summary

    cfg = load_config(args.config, args.overrides)
    for key, value in parameter_summary(build_denoiser(cfg)).items():
        print(f"{key}: {value}")


def _quickstart(args: argparse.Namespace) -> None:
    from condlora.quickstart import run_quickstart

    report = run_quickstart(Path(args.out), steps=args.steps)
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
    p.add_argument("--sampler", choices=["heun", "ddim", "ddpm"], help="default: the config's")
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
