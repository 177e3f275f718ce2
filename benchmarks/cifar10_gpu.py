"""EDM baseline vs UC-LoRA on the CIFAR-10 DDPM++ network: training and sampling throughput.

Trains each config for a fixed number of optimizer steps (after warm-up steps that are
not timed) and prints images per second and peak GPU memory for each, with the ratio to
the baseline measured in the same run. Uses the real CIFAR-10 when --data points at it,
synthetic images otherwise (throughput does not depend on the pixels).

Sampling is class-grouped (one class for the batch, as `generate` batches it), so the LoRA
layers apply one merged weight per call.

    python benchmarks/cifar10_gpu.py [--steps 50] [--batch 128] [--bf16] [--compile]
                                     [--no-channels-last] [--smoke]

--smoke runs a tiny DDPM++ for one step (the test suite's check that the script runs).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from timing import machine, print_json, print_table

from condlora.data import load_cifar10
from condlora.diffusion import sample
from condlora.image.build import build_denoiser
from condlora.image.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = ["baseline", "lora", "onlylora"]
SMOKE = ["net.model_channels=16", "net.num_blocks=1", "net.channel_mult=[1, 2]"]
SMOKE += ["net.attn_resolutions=[16]", "lora.mlp_widths=[16, 8]"]


def images(path: str | None, n: int) -> torch.Tensor:
    """n CIFAR-10 training images in [-1, 1], or synthetic ones when path is not there."""
    if path and Path(path).exists():
        return load_cifar10(path, "train")[0][:n]
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def sync(device: str) -> None:
    """Wait for queued GPU work, so wall-clock times are real."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(variant: str, args: argparse.Namespace, data: torch.Tensor) -> dict:
    """Train-step and sampling images/s and peak memory of one config."""
    cfg = load_config(
        CONFIGS / f"cifar10-edm-{args.cond}-{variant}.yaml", SMOKE if args.smoke else []
    )
    torch.manual_seed(0)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_denoiser(cfg).to(args.device).to(memory_format=layout)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    cond = {}
    if args.cond == "cond":
        cond["class_labels"] = torch.randint(0, 10, (args.batch,), generator=gen).to(args.device)
    cond["augment_labels"] = torch.zeros(args.batch, 9, device=args.device)
    loss_fn = torch.compile(model.loss) if args.compile else model.loss
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    def step() -> None:
        idx = torch.randint(0, len(data), (args.batch,), generator=gen)
        x = data[idx].to(args.device).contiguous(memory_format=layout)
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=args.bf16):
            loss = loss_fn(x, **cond)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args.device)
    train_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else 0.0

    model.eval()
    shape = (args.batch, 3, 32, 32)
    if "class_labels" in cond:  # one class for the batch: the LoRA layers merge
        cond["class_labels"] = torch.full_like(cond["class_labels"], 3)
    with torch.no_grad(), torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=args.bf16):
        sample(model, shape, steps=args.sample_steps, device=args.device, **cond)  # warm-up
        sync(args.device)
        start = time.perf_counter()
        sample(model, shape, steps=args.sample_steps, device=args.device, **cond)
        sync(args.device)
    sample_s = time.perf_counter() - start
    return {
        "parameters": params,
        "train_ips": args.steps * args.batch / train_s,
        "sample_ips": args.batch / sample_s,
        "peak_gib": peak,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (--smoke: a tiny net, one step, batch 2)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=128, help="images per step")
    parser.add_argument("--cond", choices=["uncond", "cond"], default="uncond")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the loss")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC memory layout (default on, as train.channels_last)",
    )
    parser.add_argument("--data", help="cifar-10-batches-py folder or .tar.gz (else synthetic)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny net, one step (a check)")
    args = parser.parse_args(argv)
    args.sample_steps = 18
    if args.smoke:
        args.steps, args.warmup, args.batch, args.sample_steps = 1, 1, 2, 2
    return args


def main(argv: list[str] | None = None) -> None:
    """Measure the variants; print a Markdown table with ratios to the baseline, and JSON."""
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = images(args.data, 64 if args.smoke else 4096)
    rows = {v: measure(v, args, data) for v in args.variants}
    print(
        f"batch {args.batch}, {args.steps} steps, {args.cond}, bf16 {args.bf16}, "
        f"compile {args.compile}, TF32 on CUDA, channels_last {args.channels_last}"
    )
    base = rows.get("baseline", next(iter(rows.values())))
    for r in rows.values():
        r["train_ratio"] = r["train_ips"] / base["train_ips"]
        r["sample_ratio"] = r["sample_ips"] / base["sample_ips"]
        r["memory_ratio"] = r["peak_gib"] / base["peak_gib"] if base["peak_gib"] else None
    header = ["config", "parameters", "train img/s", "x baseline"]
    header += [f"sample img/s (Heun {args.sample_steps})", "x baseline"]
    header += ["peak train memory (GiB)", "x baseline"]
    table = [
        [v, f"{r['parameters']:,}", f"{r['train_ips']:.0f}", f"{r['train_ratio']:.2f}"]
        + [f"{r['sample_ips']:.0f}", f"{r['sample_ratio']:.2f}", f"{r['peak_gib']:.2f}"]
        + [f"{r['memory_ratio']:.2f}" if r["memory_ratio"] else "-"]
        for v, r in rows.items()
    ]
    print_table(header, table)
    info = machine(args.device) | {"batch": args.batch, "bf16": args.bf16, "smoke": args.smoke}
    print_json("cifar10_gpu", info, rows)


if __name__ == "__main__":
    main()
