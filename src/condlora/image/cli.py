"""`condlora train` and `sample`: the conditioning half's commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from condlora.core.errors import CondloraError
from condlora.core.paths import default_run_folder

# Imports of torch-heavy modules happen inside the commands, so `condlora --help` is quick.


def _train(args: argparse.Namespace) -> None:
    from condlora.image.config import load_config
    from condlora.image.task import train

    if args.init_from and args.resume:
        raise CondloraError("--init-from starts a new run: it does not combine with --resume")
    if args.max_steps is not None and args.max_steps < 1:
        raise CondloraError(f"--max-steps must be >= 1, got {args.max_steps}")
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else default_run_folder(cfg.name)
    train(
        cfg,
        out,
        resume=args.resume,
        max_steps=args.max_steps,
        progress=not args.quiet,
        init_path=args.init_from,
    )
    print(f"run folder: {out}")


def _sample(args: argparse.Namespace) -> None:
    from condlora.core.images import check_image_path, save_grid
    from condlora.image.checks import check_sample_count, check_seed, sampling_config
    from condlora.image.generate import generate, labels_for
    from condlora.image.runs import load_run

    # everything that can be refused is refused before the sampling work
    check_image_path(args.out)
    check_seed(args.seed)
    if args.num < 1:
        raise CondloraError(f"--num must be at least 1, got {args.num}")
    if args.nrow < 1:
        raise CondloraError(f"--nrow must be at least 1, got {args.nrow}")
    cfg, denoiser, step = load_run(args.run)
    cfg = sampling_config(cfg, args.steps, args.sampler, args.guidance)
    check_sample_count(cfg, args.num)
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add the train and sample subcommands."""
    p = sub.add_parser("train", help="train a diffusion model from a YAML config")
    p.add_argument("--config", required=True, help="YAML config (overrides on the defaults)")
    p.add_argument("--out", help="run folder (default: runs/<name>)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--init-from",
        metavar="RUN_OR_CHECKPOINT",
        help="start from these weights (by name; e.g. a baseline run, before adding LoRA)",
    )
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
