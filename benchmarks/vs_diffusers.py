"""condlora next to diffusers: its small U-Net against a UNet2DModel of the same size, and
its conditional LoRA dropped into diffusers models.

1. condlora's digits U-Net (2x2 patches, as configs/base/digits.yaml; and the same widths
   on pixels) against a diffusers UNet2DModel of about the same parameter count, on the
   same task (16x16, one channel, ten classes): train step and sampling call.
2. The drop-in: UC-LoRA injected with `condlora.lora.inject` on the attention projections
   of a UNet2DModel, a small UNet2DConditionModel (reading its time embedding) and a small
   DiTTransformer2DModel (reading its timestep + class embedding), each against the same
   model without LoRA.

Every comparison is measured side by side in one process (rounds interleave the models;
medians over the repeats after warm-up) and reported as a ratio to its reference. A train
step is forward, MSE to a fixed target, backward and a fused AdamW step on every
parameter; a sampling call is one forward in eval mode without gradients at one timestep
(and one class for the batch).

    python benchmarks/vs_diffusers.py [--batch 64] [--device cpu|cuda] [--smoke]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from timing import interleaved, machine, print_json, print_table
from torch import nn

from condlora.image.build import build_net
from condlora.image.config import load_config
from condlora.lora import LoRAConfig, inject
from condlora.train.loop import adamw

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# UC-LoRA as the digits configs set it: rank 4, 8 bases, per-basis bias, MLP 64-32
UC = {"method": "uc", "rank": 4, "num_bases": 8, "bias": True, "mlp_widths": [64, 32]}


def condlora_unet(patch: int, smoke: bool) -> nn.Module:
    """condlora's digits U-Net (configs/digits-baseline.yaml), on p x p patches."""
    overrides = [f"net.patch_size={patch}"]
    if smoke:
        overrides += ["net.model_channels=8", "net.channel_mult=[1, 2]", "net.num_blocks=1"]
        overrides += ["net.attn_resolutions=[8]"]
    return build_net(load_config(CONFIGS / "digits-baseline.yaml", overrides))


def diffusers_unet(smoke: bool) -> nn.Module:
    """A UNet2DModel of about the digits U-Net's size (1.23M vs 1.21M parameters)."""
    widths = (8, 16, 16) if smoke else (24, 48, 64)
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=widths,
        layers_per_block=1 if smoke else 2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=10,
    )


def condition_unet(smoke: bool) -> nn.Module:
    """A small text-conditioned UNet2DConditionModel (4 latent channels, 16x16)."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32) if smoke else (32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def dit(smoke: bool) -> nn.Module:
    """A small class-conditional DiTTransformer2DModel (4 latent channels, 16x16, patch 2)."""
    return DiTTransformer2DModel(
        num_attention_heads=2 if smoke else 4,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        num_layers=2 if smoke else 6,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=8,
    )


# model kind -> (builder, module whose output UC-LoRA reads, call(model, x, t, y), shape)
KINDS: dict[str, tuple[Callable, str, Callable, tuple]] = {
    "UNet2DModel": (
        diffusers_unet,
        "time_embedding",
        lambda m, x, t, y, c: m(x, t, class_labels=y).sample,
        (1, 16, 16),
    ),
    "UNet2DConditionModel": (
        condition_unet,
        "time_embedding",
        lambda m, x, t, y, c: m(x, t, encoder_hidden_states=c).sample,
        (4, 16, 16),
    ),
    "DiTTransformer2DModel": (
        dit,
        "transformer_blocks.0.norm1.emb",
        lambda m, x, t, y, c: m(x, timestep=t, class_labels=y).sample,
        (4, 16, 16),
    ),
}


def timed_calls(model: nn.Module, call: Callable, shape: tuple, batch: int, device: str) -> dict:
    """A train step and a sampling call of `model` on fixed random inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g).to(device)
    target = torch.randn(batch, *shape, generator=g).to(device)
    steps = torch.randint(0, 1000, (batch,), generator=g).to(device)
    labels = torch.randint(0, 10, (batch,), generator=g).to(device)
    context = torch.randn(batch, 8, 32, generator=g).to(device)  # cross-attention tokens
    opt = adamw(list(model.parameters()), lr=1e-4, weight_decay=0.0)

    def train() -> None:
        model.train()
        torch.nn.functional.mse_loss(call(model, x, steps, labels, context), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample() -> None:  # one timestep and one class for the whole batch
        model.eval()
        call(model, x, steps[:1].expand(batch), labels[:1].expand(batch), context)

    return {"train": train, "sample": sample}


def build_pairs(args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    """Comparison -> {"reference": calls, "other": calls} (the ratio is other / reference)."""
    dev, batch, smoke = args.device, args.batch, args.smoke

    def unet_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, c: object):
        return m(x, t.float() / 1000, y)

    pairs = {}
    torch.manual_seed(0)
    peer = diffusers_unet(smoke).to(dev)
    for patch in (2, 1):
        ours = condlora_unet(patch, smoke).to(dev)
        pairs[f"condlora U-Net ({patch}x{patch} patches) vs UNet2DModel"] = {
            "reference": timed_calls(peer, KINDS["UNet2DModel"][2], (1, 16, 16), batch, dev),
            "other": timed_calls(ours, unet_call, (1, 16, 16), batch, dev),
            "parameters": (_count(peer), _count(ours)),
        }
    for kind, (builder, emb_module, call, shape) in KINDS.items():
        torch.manual_seed(0)
        plain = builder(smoke).to(dev)
        torch.manual_seed(0)
        lora = builder(smoke).to(dev)
        inject(lora, LoRAConfig(targets=ATTENTION, emb_module=emb_module, **UC))
        pairs[f"{kind} + UC-LoRA vs {kind}"] = {
            "reference": timed_calls(plain, call, shape, batch, dev),
            "other": timed_calls(lora, call, shape, batch, dev),
            "parameters": (_count(plain), _count(lora)),
        }
    return pairs


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--smoke", action="store_true", help="tiny models, batch 4, one round")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Measure every comparison, print a table and one JSON line."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.batch, args.warmup, args.repeats = 4, 0, 1
    clock = args.clock if args.device == "cpu" else "wall"
    info = machine(args.device) | {"clock": clock, "smoke": args.smoke, "batch": args.batch}
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    pairs = build_pairs(args)
    fns = {}
    for name, pair in pairs.items():
        for role in ("reference", "other"):
            for kind in ("train", "sample"):
                fns[(name, role, kind)] = pair[role][kind]
    times = interleaved(fns, args.warmup, args.repeats, args.device, clock)
    results, rows = {}, []
    for name, pair in pairs.items():
        r = {"parameters": list(pair["parameters"])}
        for kind in ("train", "sample"):
            ref, other = times[(name, "reference", kind)], times[(name, "other", kind)]
            r[f"{kind}_ms"] = [1000 * ref, 1000 * other]
            r[f"{kind}_time_ratio"] = other / ref
        results[name] = r
        rows.append(
            [name, f"{pair['parameters'][0]:,} / {pair['parameters'][1]:,}"]
            + [f"{r['train_ms'][0]:.1f} / {r['train_ms'][1]:.1f}", f"{r['train_time_ratio']:.3f}"]
            + [
                f"{r['sample_ms'][0]:.1f} / {r['sample_ms'][1]:.1f}",
                f"{r['sample_time_ratio']:.3f}",
            ]
        )
    header = ["comparison (other vs reference)", "parameters (ref / other)", "train step (ms)"]
    header += ["ratio", "sampling call (ms)", "ratio"]
    print_table(header, rows)
    print_json("vs_diffusers", info, results)


if __name__ == "__main__":
    main()
