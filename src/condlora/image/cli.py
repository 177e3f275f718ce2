"""`condlora train` and `sample`: the conditioning half's commands."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from condlora.core.errors import CondloraError
from condlora.core.files import default_run_folder

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
    from condlora.image.generate import generate, labels_for, prompt_labels
    from condlora.image.task import load_run

    # everything that can be refused is refused before the sampling work
    check_image_path(args.out)
    check_seed(args.seed)
    if args.num < 1:
        raise CondloraError(f"--num must be at least 1, got {args.num}")
    if args.nrow < 1:
        raise CondloraError(f"--nrow must be at least 1, got {args.nrow}")
    if (args.schedule or args.strength is not None) and not args.lora:
        raise CondloraError("--schedule and --strength apply to a --lora: give the LoRA too")
    if args.schedule and args.strength is not None:
        raise CondloraError("give --schedule (a fitted s(t)) or --strength (a constant), not both")
    if args.strength is not None and not math.isfinite(args.strength):
        raise CondloraError(f"--strength must be a finite number, got {args.strength}")
    cfg, denoiser, step = load_run(args.run)
    if args.lora:
        from condlora.image.strength import lora_with_schedule

        strength = 1.0 if args.strength is None else args.strength
        lora_with_schedule(denoiser, Path(args.lora), args.schedule, strength)
    cfg = sampling_config(cfg, args.steps, args.sampler, args.guidance)
    check_sample_count(cfg, args.num)
    labels = prompt_labels(denoiser, args.num, args.prompt, args.label)
    if labels is None:
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


def _schedule_fit(args: argparse.Namespace) -> None:
    from condlora.image.strength import FitSettings, fit_from_files

    for name in ("bins", "steps", "batch"):
        if getattr(args, name) < 1:
            raise CondloraError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.weight >= 0 or not args.lr > 0:
        raise CondloraError(f"--weight must be >= 0 and --lr > 0, got {args.weight}, {args.lr}")
    settings = FitSettings(args.steps, args.lr, args.batch, args.weight, args.seed)
    out = Path(args.out)
    schedule = fit_from_files(
        Path(args.base), Path(args.lora), Path(args.data), out, args.bins, args.blocks, settings
    )
    print(f"fitted s(t) for {len(schedule.blocks)} block(s); wrote {out}")


def _register_schedule(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("schedule", help="learned strength schedules for a static LoRA")
    schedule_sub = group.add_subparsers(dest="schedule_command", required=True)
    p = schedule_sub.add_parser(
        "fit", help="learn how strongly a LoRA acts at each noise level (and block)"
    )
    p.add_argument(
        "--base", required=True, help="the base model: a `condlora train` run or a diffusers folder"
    )
    p.add_argument("--lora", required=True, help="the LoRA (peft folder, diffusers or kohya)")
    p.add_argument("--data", required=True, help="the LoRA's images (class subfolders)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--blocks", action="store_true", help="one schedule per block of the net")
    p.add_argument("--bins", type=int, default=8, help="noise-level knots of the table")
    p.add_argument("--weight", type=float, default=1.0, help="weight of preserving the base")
    p.add_argument("--steps", type=int, default=100, help="Adam steps")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--seed", type=int, default=0, help="batches and noise")
    p.set_defaults(func=_schedule_fit)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the train, sample and schedule subcommands."""
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
    p.add_argument("--prompt", help='a text model\'s prompt for every sample (default: "")')
    p.add_argument("--steps", type=int, help="sampling steps (default: the config's)")
    p.add_argument(
        "--sampler", choices=["heun", "ddim", "ddpm", "iddpm"], help="default: the config's"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale (needs train.label_dropout)"
    )
    p.add_argument("--nrow", type=int, default=10, help="images per grid row")
    p.add_argument("--lora", help="a static LoRA to apply (peft folder, diffusers or kohya)")
    p.add_argument("--schedule", help="its fitted strength schedule (`condlora schedule fit`)")
    p.add_argument("--strength", type=float, help="or a constant strength (default 1)")
    p.set_defaults(func=_sample)
    _register_schedule(sub)


def _bake(args: argparse.Namespace) -> None:
    from condlora.image.bake import bake_run, parse_range

    t_range = parse_range(args.t)
    paths = bake_run(
        Path(args.run),
        t_range,
        Path(args.out),
        args.format,
        args.rank,
        args.label,
        args.segments,
        args.prompt,
    )
    where = Path(args.out) if args.segments > 1 or args.format == "peft" else paths[0]
    print(f"wrote {args.format} LoRA ({args.segments} segment(s)) to {where}")


def _lora_schedule(args: argparse.Namespace) -> None:
    from condlora.image.bake import LORA_FILE, schedule_run

    out = Path(args.out)
    columns = schedule_run(Path(args.run), out, args.steps, args.label, args.blocks, args.prompt)
    print(f"wrote the strengths of {len(columns)} bases per step to {out}")
    if not (out / LORA_FILE).is_file():
        print(
            "no diffusers callback file: this text model's UC-LoRA reads the pooled prompt "
            "embedding, which a pipeline's U-Net does not see (strengths at --prompt)"
        )
        return
    print(
        "in a diffusers pipeline: condlora.lora.diffusers_callback.ConditionalLoRA(pipe.unet "
        f"(a DiT's: pipe.transformer), '{out / LORA_FILE}')"
    )


def add_lora_commands(lora_sub: argparse._SubParsersAction) -> None:
    """`condlora lora bake` (a run's conditional LoRA as static files) and `lora schedule`."""
    p = lora_sub.add_parser("bake", help="a run's conditional LoRA as a static LoRA file")
    p.add_argument("run", metavar="RUN", help="run folder written by `condlora train`")
    p.add_argument("--t", required=True, help="noise-level range T0:T1 in [0, 1] (0 clean)")
    p.add_argument("--out", required=True, help="the file or folder (a folder for --segments)")
    p.add_argument("--format", required=True, choices=["kohya", "diffusers", "peft"])
    p.add_argument("--rank", type=int, help="rank of every module (default: exact)")
    p.add_argument("--label", type=int, help="class to bake at (default: mean over classes)")
    p.add_argument("--prompt", help='a text run\'s prompt to bake at (default: "")')
    p.add_argument("--segments", type=int, default=1, help="K equal parts of the range")
    p.set_defaults(func=_bake)

    p = lora_sub.add_parser("schedule", help="a TimeLoRA / UC-LoRA run's strengths per step")
    p.add_argument("run", metavar="RUN", help="run folder written by `condlora train`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's)")
    p.add_argument("--label", type=int, help="class (default: mean over classes)")
    p.add_argument("--prompt", help='a text run\'s prompt (default: "")')
    p.add_argument("--blocks", action="store_true", help="one column per block and basis")
    p.set_defaults(func=_lora_schedule)
