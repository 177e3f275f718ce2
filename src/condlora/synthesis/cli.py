"""`condlora synth ...`: the synthesis half's commands, one group with its own subcommands.

To add a subcommand, write an `_add_<name>(synth_sub)` function and list it in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse

# Imports of torch-heavy modules happen inside the commands, so `condlora --help` is quick.


def _collect(args: argparse.Namespace) -> None:
    from condlora.lora.formats import load_base_modules
    from condlora.synthesis.collection import collect

    base = load_base_modules(args.base_modules) if args.base_modules else None
    report = collect(args.loras, args.out, args.embeddings, base, skip_bad=args.skip_bad)
    for name, reason in report.skipped:
        print(f"skipped {name}: {reason}")
    print(f"took {len(report.taken)} LoRAs, skipped {len(report.skipped)}")
    print(f"wrote {report.path} ({len(report.taken)} x {report.dim})")


def _add_collect(synth_sub: argparse._SubParsersAction) -> None:
    p = synth_sub.add_parser("collect", help="a folder of LoRAs -> one dataset of vectors")
    p.add_argument("--loras", required=True, metavar="DIR", help="folder of LoRAs, any layout")
    p.add_argument("--out", required=True, metavar="DATASET", help="dataset file to write")
    p.add_argument("--embeddings", metavar="FILE", help="safetensors: LoRA name -> vector")
    p.add_argument(
        "--base-modules", metavar="FILE", help="base model's modules (.safetensors, JSON, text)"
    )
    p.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable LoRAs instead of stopping"
    )
    p.set_defaults(func=_collect)


def _demo(args: argparse.Namespace) -> None:
    from condlora.synthesis.demo.run import demo_configs, run_demo

    cfg, base_cfg = demo_configs(args.quick)
    out = args.out or ("runs/synth-demo-quick" if args.quick else "runs/synth-demo")
    report = run_demo(out, cfg, base_cfg)
    print(f"wrote {report}")


def _add_demo(synth_sub: argparse._SubParsersAction) -> None:
    p = synth_sub.add_parser(
        "demo", help="embedded end-to-end demo: a zoo of handwriting-style LoRAs on the digits"
    )
    p.add_argument(
        "--out", metavar="DIR", help="output folder (runs/synth-demo, or runs/synth-demo-quick)"
    )
    p.add_argument(
        "--quick", action="store_true", help="a smaller zoo (60 + 12 subjects) for a first look"
    )
    p.set_defaults(func=_demo)


SUBCOMMANDS = (_add_collect, _add_demo)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `synth` command group and its subcommands."""
    group = sub.add_parser("synth", help="zero-shot LoRA synthesis: collections, models")
    synth_sub = group.add_subparsers(dest="synth_command", required=True)
    for add in SUBCOMMANDS:
        add(synth_sub)
