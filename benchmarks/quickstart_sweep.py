"""Score one digits config as `condlora quickstart` scores it, for tuning its recipe.

Trains the config (with key=value overrides) into --out, or reuses the finished run there,
then samples --num class-conditional digits with the EMA weights for each number of
sampler steps given and prints one JSON line each: class accuracy, FD to the held-out
digits, the real-to-real floor and their ratio (targets: >= 95% and <= 1.2), and the
training and sampling times. The digits classifier is cached in --cache.

    python benchmarks/quickstart_sweep.py --config digits-baseline.yaml --out runs/sweep/b1 \
        --sample-steps 18,12 train.max_steps=1600 train.lr=3e-3

One thread by default (--threads), so two sweeps run side by side on two cores as the
quickstart's two workers do.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from condlora.apps.quickstart import EVAL_SAMPLES, SAMPLE_SEED
from condlora.core.config import find_config
from condlora.core.reporting import provenance
from condlora.evaluation.evaluate import digits_classifier
from condlora.image.build import build_data
from condlora.image.config import load_config
from condlora.image.generate import generate, labels_for
from condlora.image.task import load_run, train_or_reuse
from condlora.metrics import digits_metrics


def main(argv: list[str] | None = None) -> None:
    """Train or reuse, then score at each number of sampler steps."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a config of configs/")
    parser.add_argument("--out", required=True, type=Path, help="run folder")
    parser.add_argument("--cache", type=Path, default=Path("runs/sweep"), help="judge cache")
    parser.add_argument("--num", type=int, default=EVAL_SAMPLES)
    parser.add_argument("--sample-steps", default="", help="Heun steps, comma-separated")
    parser.add_argument("--seed", type=int, default=SAMPLE_SEED, help="sample seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="key=value for the config")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(find_config(args.config), args.overrides)
    train_seconds = train_or_reuse(cfg, args.out, progress=False, grids=False)
    cfg, denoiser, step = load_run(args.out)
    base_cfg = load_config(find_config("digits-baseline.yaml"))
    classifier = digits_classifier(base_cfg, args.cache)
    (train_x, _), (hold_x, _) = build_data(base_cfg)
    floor = digits_metrics(classifier, train_x[: args.num], None, hold_x)["frechet_distance"]
    labels = labels_for(cfg, args.num)
    sample_steps = [int(s) for s in args.sample_steps.split(",") if s]
    for steps in sample_steps or [cfg.diffusion.sample_steps]:
        start = time.time()
        samples = generate(denoiser, cfg, args.num, labels, steps=steps, seed=args.seed)
        scores = digits_metrics(classifier, samples, labels, hold_x)
        record = {
            "config": args.config,
            "overrides": args.overrides,
            "steps": step,
            "sample_steps": steps,
            "sample_seed": args.seed,
            "class_accuracy": round(scores["class_accuracy"], 4),
            "fd": round(scores["frechet_distance"], 3),
            "floor": round(floor, 3),
            "fd_ratio": round(scores["frechet_distance"] / floor, 3),
            "train_seconds": round(train_seconds, 1),
            "sample_seconds": round(time.time() - start, 1),
            **provenance(),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
