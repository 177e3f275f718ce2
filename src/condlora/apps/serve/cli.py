"""`condlora serve`: the local web page; gradio is imported only when the command runs."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from condlora.core.errors import CondloraError

DEFAULT_SYNTH = "runs/synth-demo"
DEFAULT_RUNS = "runs"


def _serve(args: argparse.Namespace) -> None:
    if importlib.util.find_spec("gradio") is None:
        raise CondloraError(
            "condlora serve needs gradio (the demo extra): pip install -e '.[demo]'"
        )
    if not 1 <= args.port <= 65535:
        raise CondloraError(f"--port must be in 1..65535, got {args.port}")
    runs = Path(args.runs or DEFAULT_RUNS)
    if runs.exists() and not runs.is_dir():
        raise CondloraError(f"--runs {runs} is a file, not a folder of `condlora train` runs")
    if args.runs and not runs.exists():  # the default may be missing: no runs to list yet
        raise CondloraError(
            f"--runs {runs} does not exist: give the folder of `condlora train` runs"
        )
    if args.base and not Path(args.base).is_dir():
        raise CondloraError(f"--base {args.base} is not a folder: give the demo's base model run")
    from condlora.apps.serve.server import serve

    synth = Path(args.synth or DEFAULT_SYNTH)
    base = Path(args.base) if args.base else None
    serve(runs, synth, base, args.host, args.port, explicit_synth=bool(args.synth))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `condlora serve`."""
    p = sub.add_parser("serve", help="a local web page to try synthesis and trained runs")
    p.add_argument(
        "--runs",
        metavar="DIR",
        help=f"folder of `condlora train` runs (default {DEFAULT_RUNS})",
    )
    p.add_argument(
        "--synth", metavar="DIR", help=f"a `condlora synth demo` folder (default {DEFAULT_SYNTH})"
    )
    p.add_argument(
        "--base", metavar="RUN", help="the demo's base model run (default: found from the demo)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0: every interface)",
    )
    p.set_defaults(func=_serve)
