"""Cost of LoRA conditioning: parameters, training step and sampling time vs the baseline.

Sampling is timed twice: with per-sample classes, and with one class for the whole batch,
where TimeLoRA / ClassLoRA updates are merged into the weights for the call.

Measures every digits config in one run and prints each as a ratio to the
scale-and-shift baseline, so the figures compare like with like on any machine.

    python benchmarks/lora_overhead.py [--batch 64] [--repeats 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from condlora.conditioning.build import build_data, build_denoiser
from condlora.conditioning.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAMES = ["baseline", "timelora", "classlora", "uclora", "onlylora"]


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of fn() over `repeats` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(name: str, batch: int, repeats: int, device: str) -> dict:
    """Parameters, seconds per training step and per denoiser call (sampling) of one config."""
    cfg = load_config(CONFIGS / f"digits-{name}.yaml")
    (x, y), _ = build_data(cfg)
    torch.manual_seed(0)
    model = build_denoiser(cfg).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    xb = x[:batch].to(device).contiguous(memory_format=torch.channels_last)
    yb = y[:batch].to(device)

    def train_step() -> None:
        model.loss(xb, class_labels=yb).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def denoise() -> None:
        model(xb, 1.0, class_labels=yb)

    @torch.no_grad()
    def denoise_one_class() -> None:  # a shared condition: TimeLoRA / ClassLoRA merge
        model(xb, 1.0, class_labels=torch.full_like(yb, 3))

    row = {"parameters": sum(p.numel() for p in model.parameters())}
    row["train"] = timed(train_step, repeats, device)
    model.eval()  # sampling mode: a shared condition takes the merged fast path
    row["sample"] = timed(denoise, repeats, device)
    row["one_class"] = timed(denoise_one_class, repeats, device)
    return row


def main() -> None:
    """Measure all configs and print a table of ratios to the baseline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = {n: measure(n, args.batch, args.repeats, args.device) for n in NAMES}
    base = rows["baseline"]
    print(f"device {args.device}, batch {args.batch}, torch {torch.__version__}")
    print(
        "| config | parameters | x baseline | train step (ms) | x baseline "
        "| denoiser call (ms) | x baseline | one-class call (ms) | x baseline |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(
            f"| {name} | {r['parameters']:,} | {r['parameters'] / base['parameters']:.2f} "
            f"| {1000 * r['train']:.1f} | {r['train'] / base['train']:.2f} "
            f"| {1000 * r['sample']:.1f} | {r['sample'] / base['sample']:.2f} "
            f"| {1000 * r['one_class']:.1f} | {r['one_class'] / base['one_class']:.2f} |"
        )


if __name__ == "__main__":
    main()
