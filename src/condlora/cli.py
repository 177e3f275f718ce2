"""The `condlora` command: each package registers its own subcommands; no logic here."""

from __future__ import annotations

import argparse
import sys
import traceback

from condlora.apps import cli as apps_cli
from condlora.apps.serve import server as serve_server
from condlora.apps.serve.uploads import DigitsEncoder
from condlora.core.errors import CondloraError
from condlora.evaluation import cli as evaluation_cli
from condlora.image import cli as image_cli
from condlora.lora import cli as lora_cli
from condlora.synthesis import cli as synthesis_cli
from condlora.synthesis.encoders import register_encoder


def _info(args: argparse.Namespace) -> None:
    """`condlora info`: parameter counts of an image or a synthesis config (`kind:`)."""
    from condlora.core.config import read_yaml

    if read_yaml(args.config).get("kind") == "synthesis":
        from condlora.synthesis.model import info_lines
    else:
        from condlora.image.checks import info_lines
    print("\n".join(info_lines(args.config, args.overrides)))


def _register_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter counts of a config's network(s)")
    p.add_argument("--config", required=True, help="YAML config (image or synthesis)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. lora.rank=8")
    p.set_defaults(func=_info)


def _register_lora(sub: argparse._SubParsersAction) -> None:
    lora_cli.register(sub, extra=(image_cli.add_lora_commands,))


def _register_synth(sub: argparse._SubParsersAction) -> None:
    # `synth generate --encoder digits` reads images as the page does (condlora serve)
    register_encoder("digits", lambda cfg: DigitsEncoder(cfg.path))
    synthesis_cli.register(sub, extra=(apps_cli.add_synth_demo,))


REGISTRARS = (
    image_cli.register,
    _register_info,
    evaluation_cli.register,
    apps_cli.register,
    _register_lora,
    serve_server.register,
    _register_synth,
)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line (exit 2) instead of the usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print `prog: error: message` and where the usage is, then exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = Parser(prog="condlora", description="Conditional LoRA for diffusion models.")
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback of an error (for bug reports)"
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
    return run(args)


# what torch's allocators say when an allocation fails
OUT_OF_MEMORY_TEXTS = ("can't allocate memory", "out of memory")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _out_of_memory(err: BaseException) -> bool:
    """True for a failed allocation: MemoryError, or torch's error for one (CPU or GPU)."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(s in text for s in OUT_OF_MEMORY_TEXTS)


def run(args: argparse.Namespace) -> int:
    """Run a parsed command: 0 done, 2 a user mistake (one line), 130 interrupted, 1 a bug."""
    try:
        args.func(args)
    except CondloraError as err:
        if args.debug:
            traceback.print_exc()
        print(f"condlora: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("condlora: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # anything else is a defect of condlora, not of the input
        if _out_of_memory(err):
            print(
                "condlora: error: out of memory (try a smaller model, batch or --num)",
                file=sys.stderr,
            )
            return 1
        if args.debug:
            traceback.print_exc()
        print(
            f"condlora: internal error: {type(err).__name__}: {_one_line(err)[:500]}",
            file=sys.stderr,
        )
        print(
            "condlora: this is a bug, please report it (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
