"""The `condlora` command: each package registers its own subcommands; no logic here."""

from __future__ import annotations

import argparse
import sys

from condlora.conditioning import cli as conditioning_cli
from condlora.core.errors import CondloraError
from condlora.evaluation import cli as evaluation_cli
from condlora.lora import cli as lora_cli
from condlora.synthesis import cli as synthesis_cli


def _info(args: argparse.Namespace) -> None:
    """`condlora info`: parameter counts of an image or a synthesis config (`kind:`)."""
    from condlora.core.config import read_yaml

    if read_yaml(args.config).get("kind") == "synthesis":
        from condlora.synthesis.info import info_lines
    else:
        from condlora.conditioning.param_counts import info_lines
    print("\n".join(info_lines(args.config, args.overrides)))


def _register_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter counts of a config's network(s)")
    p.add_argument("--config", required=True, help="YAML config (image or synthesis)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. lora.rank=8")
    p.set_defaults(func=_info)


REGISTRARS = (
    conditioning_cli.register,
    _register_info,
    evaluation_cli.register,
    lora_cli.register,
    synthesis_cli.register,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="condlora", description="Conditional LoRA for diffusion models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one subcommand; a user mistake prints one line and exits 2."""
    parser = build_parser()
    # key=value overrides may stand anywhere, also after options: collect the leftovers
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        args.func(args)
    except CondloraError as err:
        print(f"condlora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("condlora: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
