"""`condlora serve`: its options checked, one temporary folder for everything the server
writes, then gradio (imported only when the command runs).

Uploads (gradio's cache) and downloads go under a fresh temporary folder that is deleted when
the server stops (Ctrl-C or SIGTERM). The server binds 127.0.0.1 unless told otherwise; it
has no authentication, so another host exposes it to everyone who can reach that address.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from condlora.apps.serve.uploads import MAX_BYTES
from condlora.core.errors import CondloraError, sigterm_as_interrupt

if TYPE_CHECKING:  # gradio is imported only when the page is built
    import gradio as gr

    from condlora.apps.serve.synthesis import SynthDemo

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_address(host: str, port: int) -> None:
    """CondloraError unless `host` resolves and host:port can be bound (before gradio starts)."""
    where = f"cannot serve on {host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as err:
        reason = getattr(err, "strerror", None) or err
        raise CondloraError(f"{where}: the host cannot be resolved ({reason})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise CondloraError(f"{where}: the port is in use (pass --port)") from None
            why = f"the address cannot be bound ({err.strerror or err})"
            raise CondloraError(f"{where}: {why}: pass another --host or --port") from None


def load_demo(folders: Sequence[Path], base: Path | None, explicit: bool) -> tuple[object, str]:
    """(SynthDemo or None, why not): the first of `folders` that exists (the full demo, then
    the quick one); none there is a note on the page naming where it looked, a bad folder
    given with --synth an error."""
    from condlora.apps.serve.synthesis import SynthDemo

    if explicit:
        return SynthDemo(folders[0], base), ""
    for folder in folders:
        if folder.exists():
            return SynthDemo(folder, base), ""
    looked = " or ".join(str(f) for f in folders)
    return None, (
        f"no digits demo in {looked}: make one with `condlora synth demo` (or "
        "`condlora synth demo --quick`, a first look) in this folder, or pass --synth DIR"
    )


def serve(
    runs: Path,
    synth: Sequence[Path],
    base: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    explicit_synth: bool = False,
) -> None:
    """Serve the page until Ctrl-C or SIGTERM; everything written lives in a temporary folder,
    deleted whenever the stop comes (also while the page is still being built). `synth`: the
    demo folders to try, in order (the one given with --synth when `explicit_synth`)."""
    check_address(host, port)
    try:
        with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="condlora-serve-") as tmp:
            _serve_from(Path(tmp), runs, synth, base, host, port, explicit_synth)
    except KeyboardInterrupt:
        print("condlora serve: stopped", flush=True)


def _serve_from(
    workdir: Path,
    runs: Path,
    synth: Sequence[Path],
    base: Path | None,
    host: str,
    port: int,
    explicit_synth: bool,
) -> None:
    """Build the page with its files in workdir, launch it and block until interrupted."""
    # gradio reads these when it is imported and when the app is built
    os.environ["GRADIO_TEMP_DIR"] = str(workdir / "uploads")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    demo, problem = load_demo(synth, base, explicit_synth)
    shown = f"the demo in {demo.folder}" if demo is not None else problem
    print(f"condlora serve: Synthesis tab: {shown}", flush=True)
    app = build_page(demo, problem, runs, workdir)
    app.queue(default_concurrency_limit=1)
    try:
        app.launch(
            server_name=host,
            server_port=port,
            prevent_thread_lock=True,
            ssr_mode=False,
            quiet=True,
            show_error=False,
            max_file_size=MAX_BYTES,
            footer_links=["gradio"],
        )
    except OSError as err:  # gradio's words for a taken port are long: say it short
        why = "the port is in use" if "empty port" in str(err) else " ".join(str(err).split())
        raise CondloraError(f"cannot serve on {host}:{port}: {why} (pass --port)") from None
    try:
        _announce(host, port, workdir)
        while True:
            time.sleep(0.5)
    finally:
        app.close()


def _announce(host: str, port: int, workdir: Path) -> None:
    where = f"[{host}]" if ":" in host else host
    print(f"condlora serve: http://{where}:{port} (Ctrl-C stops it)", flush=True)
    print(f"condlora serve: uploads and downloads in {workdir}, deleted on exit", flush=True)
    if host not in LOCAL_HOSTS:
        print(
            f"condlora serve: listening on {host}: anyone who can reach it can use the page "
            "(no authentication)",
            file=sys.stderr,
            flush=True,
        )


DEFAULT_SYNTHS = ("runs/synth-demo", "runs/synth-demo-quick")  # `synth demo [--quick]`'s
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
    synth = [Path(args.synth)] if args.synth else [Path(f) for f in DEFAULT_SYNTHS]
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
        "--synth",
        metavar="DIR",
        help="a `condlora synth demo` folder (default: the first of "
        f"{', '.join(DEFAULT_SYNTHS)} that exists)",
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


def build_page(
    demo: SynthDemo | None, demo_problem: str, runs_root: Path, workdir: Path
) -> gr.Blocks:
    """The page (gr.Blocks): the Synthesis and Conditioning tabs, which lay out components and
    route events (`serve.synthesis` and `serve.conditioning` do the work). `demo` None: the
    Synthesis tab shows `demo_problem` instead. gradio is imported here, after `_serve_from`
    has set its environment."""
    import gradio as gr

    from condlora.apps.serve.conditioning_page import ConditioningPage
    from condlora.apps.serve.synthesis_page import SynthesisPage

    with gr.Blocks(title="condlora", analytics_enabled=False) as page:
        gr.Markdown("## condlora: conditional LoRA for diffusion models")
        with gr.Tab("Synthesis", id="synthesis"):
            if demo is None:
                gr.Markdown(f"⚠ {demo_problem}", elem_id="synth-status")
            else:
                SynthesisPage(demo, workdir / "downloads").build()
        with gr.Tab("Conditioning", id="conditioning"):
            ConditioningPage(runs_root).build()
    return page
