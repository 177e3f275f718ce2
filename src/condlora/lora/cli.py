"""`condlora lora info` and `condlora lora convert`: LoRA files in peft / diffusers / kohya."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from condlora.lora.formats import LoRAWeights

# Imports of torch-heavy modules happen inside the commands, so `condlora --help` is quick.

# cross-attention width (text encoder output) -> the Stable Diffusion family that has it
CROSS_ATTENTION_FAMILIES = {
    768: ": Stable Diffusion 1.x?",
    1024: ": Stable Diffusion 2.x?",
    2048: ": SDXL?",
}


def _base(args: argparse.Namespace) -> dict | None:
    from condlora.lora.formats import load_base_modules

    return load_base_modules(args.base_modules) if args.base_modules else None


def _hints(weights: LoRAWeights) -> list[str]:
    """Base-model hints: what the file says, and what the module shapes reveal."""
    hints = [f"{k}: {v}" for k, v in weights.hints.items()]
    for name, m in weights.modules.items():
        if name.endswith(("attn2.to_k", "attn2_to_k")) and not m.is_conv:
            dim = m.A.shape[1]
            family = CROSS_ATTENTION_FAMILIES.get(dim, "")
            hints.append(f"cross-attention dim {dim} (from {name}){family}")
            break
    return hints


def _info(args: argparse.Namespace) -> None:
    from condlora.lora.formats import detect_layout, read_lora
    from condlora.lora.formats.weights import clean_number

    layout, source = detect_layout(args.path)
    weights = read_lora(args.path, _base(args))
    ranks = sorted(set(weights.ranks().values()))
    scales = sorted({m.scale for m in weights.modules.values()})
    alphas = sorted({clean_number(m.scale * m.rank) for m in weights.modules.values()})
    print(f"layout: {layout} ({source})")
    print(f"modules: {len(weights.modules)}   parameters: {weights.num_parameters():,}")
    print(
        f"rank(s): {', '.join(map(str, ranks))}   alpha (scale x r): {', '.join(map(str, alphas))}"
    )
    print(f"scale(s): {', '.join(map(str, scales))}")
    if not weights.resolved:
        print("names: kohya stems (pass --base-modules to map them to module paths)")
    if weights.text_encoder:
        print(f"text-encoder modules: {len(weights.text_encoder)}")
    for hint in _hints(weights):
        print(f"base model hint: {hint}")
    print(f"unmapped keys: {len(weights.unmapped)}")
    header = f"{'module':<64} {'kind':<5} {'dW shape':<18} {'rank':>4} {'alpha':>8} {'scale':>10}"
    print(f"{header} {'|dW|':>10}")
    for name, m in {**weights.modules, **weights.text_encoder}.items():
        alpha = clean_number(m.scale * m.rank)
        print(
            f"{name:<64} {'lora':<5} {str(m.delta_shape):<18} {m.rank:>4} {alpha:>8.4g} "
            f"{m.scale:>10.4g} {m.delta_norm():>10.4g}"
        )
    for key, reason in weights.unmapped.items():
        print(f"unmapped: {key}: {reason}")
    _check_unmapped(weights, args.strict, "--strict: ")


def _check_unmapped(weights: LoRAWeights, refuse: bool, why: str) -> None:
    """LoRAError naming the first unmapped key (and how many there are) when `refuse`."""
    from condlora.core.errors import LoRAError

    if refuse and weights.unmapped:
        key, reason = next(iter(weights.unmapped.items()))
        more = f" and {len(weights.unmapped) - 1} more" if len(weights.unmapped) > 1 else ""
        raise LoRAError(f"{why}key {key!r} is not mapped ({reason}){more}")


def _convert(args: argparse.Namespace) -> None:
    from condlora.lora.formats import read_lora, write_lora

    weights = read_lora(args.input, _base(args))
    _check_unmapped(weights, not args.drop_unmapped, "pass --drop-unmapped to convert without it: ")
    for key, reason in weights.unmapped.items():
        print(f"not converted: {key}: {reason}")
    if args.rank is not None:
        from condlora.lora.canonical import canonicalize

        weights, dropped = canonicalize(weights, args.rank)
        worst = max(dropped.values(), default=0.0)
        print(
            f"re-factorised to rank {args.rank}: at most {worst:.3%} of a module's energy dropped"
        )
    written = write_lora(weights, args.out, args.to)
    if weights.text_encoder and args.to == "peft":
        print(
            f"note: {len(weights.text_encoder)} text-encoder modules were not written "
            "(a peft folder holds the U-Net's adapter only)"
        )
    where = written[0].parent if args.to == "peft" else written[0]
    print(f"wrote {args.to} LoRA ({len(weights.modules)} modules) to {where}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `lora` command group: info and convert."""
    group = sub.add_parser("lora", help="LoRA files: inspect and convert between layouts")
    lora_sub = group.add_subparsers(dest="lora_command", required=True)
    base_help = "the base model's modules: its .safetensors weights, a JSON list or a text file"

    p = lora_sub.add_parser("info", help="layout, modules, ranks, alpha, scale, dW norms")
    p.add_argument("path", metavar="FILE_OR_DIR", help="peft folder, diffusers or kohya file")
    p.add_argument("--base-modules", metavar="FILE", help=base_help)
    p.add_argument("--strict", action="store_true", help="refuse a file with any unmapped key")
    p.set_defaults(func=_info)

    p = lora_sub.add_parser("convert", help="convert a LoRA to another layout (scale kept)")
    p.add_argument("input", metavar="IN", help="peft folder, diffusers or kohya file")
    p.add_argument("--to", required=True, choices=["peft", "diffusers", "kohya"])
    p.add_argument(
        "--out", required=True, help="peft: folder; diffusers: folder or file; kohya: file"
    )
    p.add_argument("--rank", type=int, help="re-factorise to this rank (canonical SVD)")
    p.add_argument("--base-modules", metavar="FILE", help=base_help)
    p.add_argument(
        "--drop-unmapped", action="store_true", help="convert even if some keys are not mapped"
    )
    p.set_defaults(func=_convert)
