"""The synthesis demo's zoo recipe, measured on a few validation subjects: does a recipe keep
the digits legible (class accuracy) while it carries the style (subject score)?

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/synth_demo_zoo.py \
        --subjects 8 --set steps=150 --set lr=5e-3 [--set targets=qkv,proj,skip]
    python benchmarks/synth_demo_zoo.py --subjects 0 --time-steps 20 [--set ...]  # the zoo's cost

Fine-tunes `--subjects` validation subjects of the demo (`condlora synth demo`'s config
with the overrides) on the quickstart's baseline (runs/quickstart/baseline, or --base),
draws `--per-class` samples of every digit per subject and prints the fine-tuned LoRAs'
class accuracy (the digits judge), subject score and normalised subject score ((LoRA - no
LoRA) / (real - no LoRA): here the ceiling is the real styled digits, the zoo has no
better one), the base model alone, and the fine-tuning time. The judge and the encoder
are cached in --cache. `--time-steps N` first times N fine-tuning steps of a full batch of
subjects (the demo's 40), so recipes are compared at the zoo's own cost per LoRA.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from torch import Tensor

from condlora.apps.synthesis_demo.config import DemoConfig, tiny
from condlora.apps.synthesis_demo.run import demo_configs
from condlora.apps.synthesis_demo.scoring import (
    class_accuracies,
    sample_subjects,
    subject_scores,
)
from condlora.apps.synthesis_demo.stages import StageClock, digits_judge, subject_encoder
from condlora.apps.synthesis_demo.styles import apply_style
from condlora.apps.synthesis_demo.zoo import Subjects, draw_seed, fine_tune, make_subjects
from condlora.diffusion import Denoiser
from condlora.image.build import build_data
from condlora.image.task import load_run


def override(cfg: DemoConfig, text: str) -> DemoConfig:
    """cfg with one `name=value` applied (tuples comma-separated, None as `none`)."""
    name, value = text.split("=", 1)
    current = getattr(cfg, name)
    if isinstance(current, tuple):
        return dataclasses.replace(cfg, **{name: tuple(value.split(","))})
    if value.lower() == "none":
        return dataclasses.replace(cfg, **{name: None})
    kind = type(current) if current is not None else float
    return dataclasses.replace(cfg, **{name: kind(value)})


def zoo_cost(
    base: Denoiser, subs: Subjects, images: Tensor, labels: Tensor, cfg: DemoConfig, steps: int
) -> str:
    """The zoo's cost line: seconds per fine-tuning step of a full batch of training
    subjects, and per LoRA at cfg.steps."""
    batch = subs.train[: cfg.subjects_per_batch]
    timed = dataclasses.replace(cfg, steps=steps)
    start = time.perf_counter()
    fine_tune(base, subs.styles[batch], images, labels, timed, [draw_seed(cfg, i) for i in batch])
    per_step = (time.perf_counter() - start) / steps
    return (
        f"zoo cost: {per_step:.3f} s per step of {len(batch)} subjects, "
        f"{per_step * cfg.steps / len(batch):.2f} s per LoRA at {cfg.steps} steps"
    )


def main(argv: list[str] | None = None) -> None:
    """Fine-tune, sample, score, print one line per row."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subjects", type=int, default=8, help="0: only the --time-steps line")
    p.add_argument("--per-class", type=int, default=4)
    p.add_argument("--set", action="append", default=[], help="DemoConfig override name=value")
    p.add_argument("--base", default="runs/quickstart/baseline")
    p.add_argument("--cache", default="runs/synth-demo-zoo-cache")
    p.add_argument("--smoke", action="store_true", help="the tests' tiny demo config")
    p.add_argument(
        "--time-steps",
        type=int,
        default=0,
        help="also time this many fine-tuning steps of a full batch of subjects "
        "(subjects_per_batch, as the demo's zoo runs them)",
    )
    args = p.parse_args(argv)
    cfg = tiny() if args.smoke else demo_configs(False)[0]
    for text in args.set:
        cfg = override(cfg, text)
    base_cfg, base, _ = load_run(Path(args.base))
    (train_x, train_y), (hold_x, _) = build_data(base_cfg)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    clock = StageClock(cache / "stages.json")
    fixed = tiny() if args.smoke else DemoConfig()  # the judge and encoder: no overrides
    judge = digits_judge(cache / "judge.safetensors", train_x, train_y, fixed, clock)
    encoder = subject_encoder(cache / "encoder.safetensors", train_x, fixed, clock)
    subs = make_subjects(cfg)
    if args.time_steps:
        print(zoo_cost(base, subs, train_x, train_y, cfg, args.time_steps))
    if args.subjects == 0:  # the cost alone
        return
    picked = subs.val[: args.subjects]
    styles = subs.styles[picked]
    start = time.perf_counter()
    loras = fine_tune(base, styles, train_x, train_y, cfg, [draw_seed(cfg, i) for i in picked])
    seconds = time.perf_counter() - start
    targets = encoder.embed_sets(torch.stack([apply_style(hold_x, s) for s in styles]))
    real = encoder.embed_sets(
        torch.stack([apply_style(train_x[: 10 * args.per_class], s) for s in styles])
    )
    real_score = float((real * targets).sum(dim=1).mean())
    rows = {}
    for name, weights in (("fine-tuned", loras), ("no LoRA", None)):
        samples = sample_subjects(
            base, weights, len(picked), args.per_class, 0, cfg.sample_steps, cfg.rank
        )
        score = float(subject_scores(encoder, samples, targets).mean())
        rows[name] = (score, float(class_accuracies(judge, samples).mean()))
    floor = rows["no LoRA"][0]
    for name, (score, acc) in rows.items():
        norm = (score - floor) / (real_score - floor)
        print(
            f"{name}: class accuracy {100 * acc:.1f}%  subject score {score:.3f}  "
            f"normalised to real {norm:.2f}"
        )
    print(f"real styled digits: subject score {real_score:.3f}")
    print(
        f"fine-tuning: {seconds:.1f} s for {len(picked)} subjects, "
        f"{loras[0].num_parameters():,} numbers per LoRA  overrides: {args.set}"
    )


if __name__ == "__main__":
    main()
