"""`condlora lora info | convert | resize | merge`: LoRA files in peft / diffusers / kohya
(and what they can hold: LyCORIS kinds, DoRA, text encoders). `lora bake | schedule` read a
run, so the image layer adds them (`register(sub, extra=...)`, condlora.image.cli)."""

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
    """Base-model hints that the module shapes reveal."""
    from condlora.lora.formats.kohya import cross_attention

    width = cross_attention(weights)
    if width is None:
        return []
    family = CROSS_ATTENTION_FAMILIES.get(width[0], "")
    return [f"cross-attention dim {width[0]} (from {width[1]}){family}"]


def _read(path: str, args: argparse.Namespace) -> LoRAWeights:
    """A LoRA file with every kind of module, names mapped through --base-modules."""
    from condlora.lora.formats import read_lora

    return read_lora(path, _base(args), other_kinds=True, unmapped_ok=True)


def _info(args: argparse.Namespace) -> None:
    from condlora.lora.formats import detect_layout
    from condlora.lora.formats.weights import clean_number

    layout, source = detect_layout(args.path)
    weights = _read(args.path, args)
    ranks = sorted(set(weights.ranks().values()))
    scales = sorted({m.scale for m in weights.modules.values()})
    alphas = sorted({clean_number(m.scale * m.rank) for m in weights.modules.values()})
    print(f"layout: {layout} ({source})")
    count = len(weights.modules) + len(weights.text_encoder) + len(weights.others)
    print(f"modules: {count}   parameters: {weights.num_parameters():,}")
    print(
        f"rank(s): {', '.join(map(str, ranks))}   alpha (scale x r): {', '.join(map(str, alphas))}"
    )
    print(f"scale(s): {', '.join(map(str, scales))}")
    if not weights.resolved:
        print("names: kohya stems (pass --base-modules to map them to module paths)")
    if weights.text_encoder:
        print(f"text-encoder modules: {len(weights.text_encoder)}")
    for what in sorted({m.describe() for m in weights.others.values()}):
        group = [m for m in weights.others.values() if m.describe() == what]
        dw = "exact dW" if group[0].exact else "dW needs the base weight"
        print(f"{group[0].kind} modules: {len(group)}, {what}: {dw}, no low-rank form")
    for key, value in weights.hints.items():  # header keys (kohya ss_*, modelspec.*)
        print(f"metadata: {key}: {value}")
    for hint in _hints(weights):
        print(f"base model hint: {hint}")
    print(f"unmapped keys: {len(weights.unmapped)}")
    header = f"{'module':<64} {'kind':<6} {'dW shape':<18} {'rank':>4} {'alpha':>8} {'scale':>10}"
    print(f"{header} {'|dW|':>10}")
    for name, m in {**weights.modules, **weights.text_encoder, **weights.others}.items():
        kind, rank = getattr(m, "kind", "lora"), m.rank
        alpha = "-" if rank is None else f"{clean_number(m.scale * rank):.4g}"
        norm = m.delta_norm()
        norm = "n/a" if norm is None else f"{norm:.4g}"  # DoRA: dW needs the base weight
        print(
            f"{name:<64} {kind:<6} {str(m.delta_shape):<18} {rank or '-':>4} {alpha:>8} "
            f"{m.scale:>10.4g} {norm:>10}"
        )
    for key, reason in weights.unmapped.items():
        print(f"unmapped: {key}: {reason}")
    if args.strict:
        weights.check_mapped("--strict: ")


def _print_errors(errors: dict[str, float], weights: LoRAWeights, what: str) -> None:
    """One line per re-factorised module: its new rank and the relative error of its dW."""
    for name, err in errors.items():
        m = weights.modules.get(name) or weights.text_encoder[name]
        print(f"{what}: {name}: rank {m.rank}, relative error {err:.3e}")


def _write(weights: LoRAWeights, args: argparse.Namespace, to: str) -> None:
    """Write the LoRA; say where, and what a peft folder cannot hold."""
    from condlora.lora.formats import write_lora

    if not args.drop_unmapped:
        weights.check_mapped("pass --drop-unmapped to go without it: ")
    for key, reason in weights.unmapped.items():
        print(f"not written: {key}: {reason}")
    written = write_lora(weights, args.out, to)
    where = args.out if to == "peft" else written[0]
    count = len(weights.modules) + len(weights.text_encoder) + len(weights.others)
    print(f"wrote {to} LoRA ({count} modules) to {where}")
    if to == "peft" and weights.text_encoder:  # one adapter per model, as peft loads them
        print(f"peft adapters: {', '.join(sorted({str(p.parent.name) for p in written}))}")


def _convert(args: argparse.Namespace) -> None:
    from condlora.lora.formats.files import holds
    from condlora.lora.formats.svd import as_plain_lora

    weights = _read(args.input, args)
    if weights.others and (args.rank is not None or not holds(weights, args.to)):
        weights, errors = as_plain_lora(weights, args.rank)
        _print_errors(errors, weights, "SVD of the exact dW")
    if args.rank is not None:
        from condlora.lora.canonical import canonicalize
        from condlora.lora.formats import LoRAWeights

        weights, dropped = canonicalize(weights, args.rank)
        text, dropped_text = canonicalize(LoRAWeights(weights.text_encoder), args.rank)
        weights.text_encoder, dropped = text.modules, dropped | dropped_text
        worst = max(dropped.values(), default=0.0)
        print(
            f"re-factorised to rank {args.rank}: at most {worst:.3%} of a module's energy dropped"
        )
    _write(weights, args, args.to)


def _same_layout(weights: LoRAWeights, to: str | None) -> str:
    """--to, else the input's own layout (ComfyUI files are written as kohya)."""
    return to or {"peft": "peft", "diffusers": "diffusers"}.get(weights.layout, "kohya")


def _resize(args: argparse.Namespace) -> None:
    from condlora.lora.formats.svd import resize

    weights = _read(args.input, args)
    resized, errors = resize(weights, args.rank, args.energy)
    _print_errors(errors, resized, "resized")
    _write(resized, args, _same_layout(weights, args.to))


def _merge(args: argparse.Namespace) -> None:
    from condlora.lora.formats.svd import merge

    loras = [_read(path, args) for path in args.inputs]
    coefficients = args.weights or [1.0] * len(loras)
    merged, errors = merge(loras, coefficients, args.rank, args.energy)
    _print_errors(errors, merged, "merged")
    _write(merged, args, _same_layout(loras[0], args.to))


def _add_output(p: argparse.ArgumentParser, to_required: bool, base_help: str) -> None:
    """--to, --out, --base-modules and --drop-unmapped: the options of every writing command."""
    p.add_argument("--to", required=to_required, choices=["peft", "diffusers", "kohya"])
    p.add_argument(
        "--out", required=True, help="peft: folder; diffusers: folder or file; kohya: file"
    )
    p.add_argument("--base-modules", metavar="FILE", help=base_help)
    p.add_argument(
        "--drop-unmapped", action="store_true", help="write even if some keys are not mapped"
    )


def _add_rank(p: argparse.ArgumentParser) -> None:
    """--rank R | --energy E: how many singular pairs to keep."""
    choice = p.add_mutually_exclusive_group(required=True)
    choice.add_argument("--rank", type=int, help="keep this many singular pairs per module")
    choice.add_argument(
        "--energy", type=float, help="keep the fewest pairs holding this fraction of ||dW||^2"
    )


def register(sub: argparse._SubParsersAction, extra: tuple = ()) -> None:
    """Add the `lora` command group: info, convert, resize, merge, and the subcommands that
    the registrars in `extra` add (layers above this one: bake and schedule of a run)."""
    group = sub.add_parser("lora", help="LoRA files: inspect and convert between layouts")
    lora_sub = group.add_subparsers(dest="lora_command", required=True)
    base_help = (
        "the base model's modules: a condlora run folder or checkpoint, its .safetensors "
        "weights, its diffusers U-Net config.json, a JSON list or a text file"
    )

    p = lora_sub.add_parser("info", help="layout, modules, ranks, alpha, scale, dW norms")
    p.add_argument("path", metavar="FILE_OR_DIR", help="peft folder, diffusers or kohya file")
    p.add_argument("--base-modules", metavar="FILE", help=base_help)
    p.add_argument("--strict", action="store_true", help="refuse a file with any unmapped key")
    p.set_defaults(func=_info)

    p = lora_sub.add_parser("convert", help="convert a LoRA to another layout (scale kept)")
    p.add_argument("input", metavar="IN", help="peft folder, diffusers or kohya file")
    p.add_argument("--rank", type=int, help="re-factorise to this rank (canonical SVD)")
    _add_output(p, True, base_help)
    p.set_defaults(func=_convert)

    p = lora_sub.add_parser("resize", help="re-factorise every module's exact dW by SVD")
    p.add_argument("input", metavar="IN", help="peft folder, diffusers, kohya or LyCORIS file")
    _add_rank(p)
    _add_output(p, False, base_help)
    p.set_defaults(func=_resize)

    p = lora_sub.add_parser("merge", help="weighted sum of LoRAs' dW, re-factorised by SVD")
    p.add_argument("inputs", metavar="IN", nargs="+", help="LoRA files or peft folders")
    p.add_argument("--weights", type=float, nargs="+", help="one per LoRA (default: all 1)")
    _add_rank(p)
    _add_output(p, False, base_help)
    p.set_defaults(func=_merge)
    for add in extra:
        add(lora_sub)
