"""Running the page: one temporary folder for everything the server writes, then gradio.

Uploads (gradio's cache) and downloads go under a fresh temporary folder that is deleted when
the server stops (Ctrl-C or SIGTERM). The server binds 127.0.0.1 unless told otherwise; it
has no authentication, so another host exposes it to everyone who can reach that address.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from condlora.apps.serve.uploads import MAX_BYTES
from condlora.core.errors import CondloraError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def load_demo(folder: Path, base: Path | None, explicit: bool) -> tuple[object, str]:
    """(SynthDemo or None, why not): a missing default folder is a note on the page, a bad
    folder given with --synth an error."""
    from condlora.apps.serve.synthesis import SynthDemo

    if not explicit and not folder.exists():
        return None, (
            f"no digits demo in {folder}: make one with `condlora synth demo --out {folder}` "
            "(or pass --synth DIR)"
        )
    return SynthDemo(folder, base), ""


def serve(
    runs: Path,
    synth: Path,
    base: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    explicit_synth: bool = False,
) -> None:
    """Serve the page until interrupted; everything written lives in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="condlora-serve-") as tmp:
        workdir = Path(tmp)
        # gradio reads these when it is imported and when the app is built
        os.environ["GRADIO_TEMP_DIR"] = str(workdir / "uploads")
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
        from condlora.apps.serve.page import build_page

        demo, problem = load_demo(synth, base, explicit_synth)
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
        _announce(host, port, workdir)
        _wait(app)


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


def _wait(app: object) -> None:
    """Block until Ctrl-C or SIGTERM, then close the server."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("condlora serve: stopped", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        app.close()
