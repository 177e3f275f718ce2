"""Training steps at the paper's size: the VAE and the latent prior of a synthesis config
(default configs/synthesis/w2w-sd15.yaml: 99,648 numbers per LoRA, latent 512, 512-d
embeddings), on synthetic data, plus the time to generate one LoRA from an embedding.

Each step is the loop's own work: loss forward, backward, gradient clipping, fused AdamW.
Prints a table and one JSON line.

    python benchmarks/synthesis_scale.py [--device cuda] [--batch 8] [--steps 3] [--smoke]

--smoke shrinks the config to a few hundred numbers per LoRA (the test suite's check).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from timing import machine, print_json, print_table

from condlora.diffusion import EmbeddingGuidedDenoiser, sample
from condlora.synthesis.config import load_synth_config, resolve
from condlora.synthesis.model import LoRAVAE, build_prior
from condlora.synthesis.training import PriorLoss, VAELoss
from condlora.train.loop import adamw

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthesis" / "w2w-sd15.yaml"
SMOKE = ["dim=96", "cond_dim=8", "vae.latent=8", "vae.hidden=16", "prior.net.width=16"]
SMOKE += ["prior.net.depth=1", "prior.net.cond_width=8", "prior.steps=2"]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, steps: int, device: str) -> float:
    """Median seconds of fn() over `steps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def train_step_time(loss_fn, batch: dict, steps: int, device: str, bf16: bool) -> float:
    """Seconds per optimizer step of a loss module on a fixed batch."""
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    opt = adamw(params, 1e-4, 0.0)

    def step() -> None:
        with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=bf16):
            loss = loss_fn(**batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, steps, device)


def peak_memory_gib(device: str) -> float:
    """Peak accelerator memory, or the process's peak resident memory on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(args: argparse.Namespace) -> list[dict]:
    """Seconds per VAE and prior training step and per generated LoRA."""
    cfg = resolve(load_synth_config(args.config, SMOKE if args.smoke else []))
    d, e, device = cfg.dim, cfg.cond_dim, args.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, d, generator=g).to(device)
    emb = torch.nn.functional.normalize(torch.randn(args.batch, e, generator=g), dim=1).to(device)
    drop = (torch.rand(args.batch, generator=g) < cfg.prior.cond_dropout).to(device)
    rows = []
    torch.manual_seed(0)
    vae = LoRAVAE(cfg.vae).to(device)
    seconds = train_step_time(VAELoss(vae), {"x": x}, args.steps, device, args.bf16)
    rows.append(
        {
            "part": "VAE train step",
            "parameters": sum(p.numel() for p in vae.parameters()),
            "seconds": seconds,
            "samples_per_s": args.batch / seconds,
        }
    )
    prior = build_prior(cfg.prior).to(device)
    z = torch.randn(args.batch, cfg.prior.net.dim, generator=g).to(device)
    batch = {"x0": z, "embedding": emb, "drop": drop}
    seconds = train_step_time(PriorLoss(prior), batch, args.steps, device, args.bf16)
    rows.append(
        {
            "part": "prior train step",
            "parameters": sum(p.numel() for p in prior.parameters()),
            "seconds": seconds,
            "samples_per_s": args.batch / seconds,
        }
    )
    vae.eval()
    prior.eval()
    guided = EmbeddingGuidedDenoiser(prior, cfg.prior.guidance)

    @torch.no_grad()
    def generate_one() -> None:
        shape = (1, cfg.prior.net.dim)
        latent = sample(
            guided, shape, cfg.prior.sampler, cfg.prior.steps, device=device, embedding=emb[:1]
        )
        vae.decode(latent)

    seconds = timed(generate_one, args.steps, device)
    rows.append(
        {
            "part": f"generate 1 LoRA ({cfg.prior.steps} {cfg.prior.sampler} steps, CFG)",
            "parameters": 0,
            "seconds": seconds,
            "samples_per_s": 1 / seconds,
        }
    )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=CONFIG, help="synthesis config")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median), after one warm-up")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (as mixed_precision bf16)")
    p.add_argument("--smoke", action="store_true", help="a tiny config (a check that it runs)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch = 1, 2
    return args


def main(argv: list[str] | None = None) -> None:
    """Measure, then print a Markdown table and one JSON line."""
    args = parse_args(argv)
    rows = measure(args)
    peak = peak_memory_gib(args.device)
    print(f"config {args.config.name}, batch {args.batch}, bf16 {args.bf16}")
    table = [
        [r["part"], f"{r['parameters']:,}" if r["parameters"] else "-"]
        + [f"{r['seconds']:.3f}", f"{r['samples_per_s']:.1f}"]
        for r in rows
    ]
    print_table(["part", "parameters", "s / step", "samples/s"], table)
    info = machine(args.device) | {"config": str(args.config), "batch": args.batch}
    info |= {"bf16": args.bf16, "smoke": args.smoke, "peak_memory_gib": round(peak, 2)}
    print_json("synthesis_scale", info, {r["part"]: r for r in rows})


if __name__ == "__main__":
    main()
