"""bf16 autocast and torch.compile on the quickstart's two digits configs: what pays?

For digits-baseline and digits-uclora, a train step (as `condlora train` runs it: forward,
backward, gradient clipping, fused AdamW, EMA) and a class-grouped sampling call, each in
fp32, under bf16 autocast (`train.mixed_precision=bf16`), with `torch.compile` of the loss
(`train.compile=true`), with both, and with oneDNN's implicit bf16 (`bf16-implicit`: the
float32 convolutions and matmuls computed in bf16 inside the kernels, no casts); all
variants measured side by side in one process
(medians over the repeats after warm-up; compilation happens in the warm-up), ratios to
fp32. bf16 pays on CPUs with AMX / AVX-512 bf16 units; elsewhere it emulates.

    python benchmarks/cpu_speed.py [--batch 64] [--sample-batch 150] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from timing import interleaved, machine, print_json, print_table

from condlora.image.build import build_denoiser
from condlora.image.config import load_config
from condlora.train.checkpoint import EMA
from condlora.train.loop import adamw

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODELS = {"baseline": "digits-baseline", "uclora": "digits-uclora"}
VARIANTS = {  # name -> (bf16: "autocast" | "implicit" | None, torch.compile)
    "fp32": (None, False),
    "bf16": ("autocast", False),
    "compile": (None, True),
    "bf16+compile": ("autocast", True),
    # oneDNN's float32 convolutions and matmuls computed in bf16 inside the kernels
    # (torch >= 2.9: torch.backends.mkldnn.{conv,matmul}.fp32_precision), no casts around them
    "bf16-implicit": ("implicit", False),
}
SMOKE = ["net.model_channels=8", "net.channel_mult=[1, 2]", "net.num_blocks=1"]


@contextlib.contextmanager
def implicit_bf16():  # noqa: ANN201
    """oneDNN's float32 convolutions and matmuls in bf16 for the block (restored after)."""
    backends = [torch.backends.mkldnn.conv, torch.backends.mkldnn.matmul]
    saved = [b.fp32_precision for b in backends]
    try:
        for b in backends:
            b.fp32_precision = "bf16"
        yield
    finally:
        for b, value in zip(backends, saved, strict=True):
            b.fp32_precision = value


def calls(config: str, bf16: str | None, compiled: bool, args: argparse.Namespace) -> dict:
    """The train step and the sampling call of one config in one variant."""
    cfg = load_config(CONFIGS / f"{config}.yaml", SMOKE if args.smoke else [])
    torch.manual_seed(0)
    model = build_denoiser(cfg).to(memory_format=torch.channels_last)
    params = list(model.parameters())
    opt, ema = adamw(params, lr=1e-4, weight_decay=0.0), EMA(model, 0.999)
    g = torch.Generator().manual_seed(0)
    res = cfg.data.resolution
    x = (torch.rand(args.batch, 1, res, res, generator=g) * 2 - 1).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, 10, (args.batch,), generator=g)
    xs = torch.randn(args.sample_batch, 1, res, res, generator=g).contiguous(
        memory_format=torch.channels_last
    )
    ys = torch.full((args.sample_batch,), 3)
    loss_fn = torch.compile(model.loss) if compiled else model.loss
    denoise = torch.compile(model) if compiled else model
    step = [0]

    def precision():  # noqa: ANN202
        if bf16 == "implicit":
            return implicit_bf16()
        if bf16 == "autocast":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train() -> None:
        model.train()
        with precision():
            loss = loss_fn(x, class_labels=y)
        with implicit_bf16() if bf16 == "implicit" else contextlib.nullcontext():
            loss.backward()  # outside autocast, as torch recommends; implicit bf16 applies
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step[0] += 1
        ema.update(model, step[0])

    @torch.no_grad()
    def sample() -> None:
        model.eval()
        with precision():
            denoise(xs, 1.0, class_labels=ys)

    return {"train": train, "sample": sample}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="training batch")
    parser.add_argument("--sample-batch", type=int, default=150, help="one class's batch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (compiles)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--smoke", action="store_true", help="tiny nets, batch 4, one round")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Measure every model in every variant, print a table and one JSON line."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.batch, args.sample_batch, args.warmup, args.repeats = 4, 4, 1, 1
    variants = [v.strip() for v in args.variants.split(",")]
    info = machine("cpu") | {"clock": args.clock, "smoke": args.smoke}
    info |= {"batch": args.batch, "sample_batch": args.sample_batch}
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    fns = {}
    for model, config in MODELS.items():
        for variant in variants:
            for kind, fn in calls(config, *VARIANTS[variant], args).items():
                fns[(model, variant, kind)] = fn
    times = interleaved(fns, args.warmup, args.repeats, "cpu", args.clock)
    results, rows = {}, []
    for model in MODELS:
        for variant in variants:
            r = {}
            for kind in ("train", "sample"):
                r[f"{kind}_ms"] = 1000 * times[(model, variant, kind)]
                r[f"{kind}_time_ratio"] = (
                    times[(model, variant, kind)] / times[(model, "fp32", kind)]
                )
            results[f"{model} {variant}"] = r
            rows.append(
                [model, variant, f"{r['train_ms']:.1f}", f"{r['train_time_ratio']:.3f}"]
                + [f"{r['sample_ms']:.1f}", f"{r['sample_time_ratio']:.3f}"]
            )
    header = ["model", "variant", "train step (ms)", "x fp32", "sampling call (ms)", "x fp32"]
    print_table(header, rows)
    print_json("cpu_speed", info, results)


if __name__ == "__main__":
    main()
