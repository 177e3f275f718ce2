"""What conditional LoRA adds to one class-grouped sampling call, in milliseconds.

Each digits LoRA config is timed against the same network with its LoRA wrappers removed
(a copy of the model, `condlora.lora.remove`): the difference is the LoRA's own cost per
denoiser call (the composers, the merged weights, the checks and hooks), free of the
differences between separately built models that `overhead.py`'s ratios carry. Calls are
in sampling mode (eval, no gradients) with one class and one noise level for the batch, so
every wrapper merges. Rounds interleave all models; per model the 10th percentile and the
median of its calls, and the median of the per-round differences to the plain net.
Batch 1 makes the network's own work small, so the LoRA's share stands out of the noise
of a shared machine; the merged path's cost does not depend on the batch.

    python benchmarks/lora_call_cost.py [--batch 1,64] [--rounds 300] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from timing import machine, print_json, print_table

from condlora.image.build import build_denoiser
from condlora.image.config import load_config
from condlora.lora import lora_parameters, remove

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = {"time": "digits-timelora", "time+class": "digits-classlora", "uc": "digits-uclora"}
SMOKE = ["net.model_channels=8", "net.channel_mult=[1, 2]", "net.num_blocks=1"]


def build(config: str, overrides: list[str]) -> torch.nn.Module:
    """A config's denoiser in sampling mode, its LoRA randomised (B = 0 would merge to W)."""
    torch.manual_seed(0)
    model = build_denoiser(load_config(CONFIGS / f"{config}.yaml", overrides)).eval()
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.05)
    return model


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of values (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def measure(models: dict, batch: int, warmup: int, rounds: int) -> dict:
    """Per model: p10 and median ms of a call, and the median per-round difference to plain."""
    x = torch.rand(batch, 1, 16, 16).contiguous(memory_format=torch.channels_last) * 2 - 1
    labels, sigma = torch.full((batch,), 3), torch.tensor(1.0)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for round_ in range(warmup + rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(x, sigma, class_labels=labels)
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    plain = times["plain"]
    return {
        name: {
            "p10_ms": 1000 * quantile(ts, 0.1),
            "median_ms": 1000 * quantile(ts, 0.5),
            "lora_ms": 1000 * quantile([a - b for a, b in zip(ts, plain, strict=True)], 0.5),
        }
        for name, ts in times.items()
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,64", help="batch sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=300, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--smoke", action="store_true", help="tiny nets, two rounds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Time every config against its net without LoRA; one table per batch, one JSON line."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = SMOKE if args.smoke else []
    rounds, warmup = (2, 1) if args.smoke else (args.rounds, args.warmup)
    models = {name: build(config, overrides) for name, config in METHODS.items()}
    plain = copy.deepcopy(models["uc"])  # the digits net is the same in every config
    remove(plain)
    models = {"plain": plain, **models}
    info = machine("cpu") | {"smoke": args.smoke, "rounds": rounds}
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    results = {}
    for batch in (int(b) for b in args.batch.split(",")):
        results[str(batch)] = measure(models, batch, warmup, rounds)
        print(f"\nbatch {batch}, class-grouped sampling call, {rounds} interleaved rounds")
        header = ["model", "call p10 (ms)", "call median (ms)", "LoRA per call (ms)"]
        rows = [
            [name, f"{r['p10_ms']:.2f}", f"{r['median_ms']:.2f}", f"{r['lora_ms']:.3f}"]
            for name, r in results[str(batch)].items()
        ]
        print_table(header, rows)
    print_json("lora_call_cost", info, results)


if __name__ == "__main__":
    main()
