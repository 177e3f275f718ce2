"""Screenshots of both tabs of `condlora serve` for the README (docs/serve-*.png).

    python scripts/serve_screenshots.py [--synth runs/synth-demo] [--runs runs] [--base RUN]
                                        [--subject s0203] [--method NAME] [--run NAME]

Starts the server on a free local port, drives it with headless Chromium (playwright and the
system's /usr/bin/chromium; no browser download), writes docs/serve-synthesis.png and
docs/serve-conditioning.png. Without a finished demo in --synth it builds the tiny demo of
the test suite in a temporary folder; without runs under --runs it trains a tiny ClassLoRA
run there (a few seconds each, so the pictures show the page, not good digits).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the test suite's tiny digits net (tests/conftest.py TINY), trained for a few steps
TINY_NET = ["net.model_channels=8", "net.channel_mult=[1, 2]", "net.num_blocks=1"]
TINY_NET += ["net.attn_resolutions=[8]", "train.batch_size=16", "train.warmup_steps=5"]
TINY_NET += ["train.sample_every=0", "train.ckpt_every=0", "diffusion.sample_steps=3"]


def tiny_demo(folder: Path) -> Path:
    """The tiny demo (condlora.apps.synthesis_demo.config.tiny) in `folder`."""
    from condlora.apps.synthesis_demo.config import tiny
    from condlora.apps.synthesis_demo.run import run_demo
    from condlora.image.config import load_config

    base_cfg = load_config(
        REPO / "configs" / "digits-baseline.yaml", [*TINY_NET, "train.max_steps=40"]
    )
    run_demo(folder, tiny(), base_cfg, base_candidates=[], progress=False)
    return folder


def tiny_run(root: Path) -> Path:
    """A ClassLoRA + TimeLoRA run of 20 steps in root/classlora."""
    from condlora.image.config import load_config
    from condlora.image.task import train_or_reuse

    cfg = load_config(REPO / "configs" / "digits-classlora.yaml", [*TINY_NET, "train.max_steps=20"])
    train_or_reuse(cfg, root / "classlora", progress=False)
    return root


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(synth: Path, runs: Path, base: str | None) -> tuple[subprocess.Popen, str]:
    """`condlora serve` in a subprocess; returns it and its address once it answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "condlora.cli", "serve", "--port", str(port)]
    cmd += ["--synth", str(synth), "--runs", str(runs)] + (["--base", base] if base else [])
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}/"
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                sys.exit("the server stopped before it answered")
            time.sleep(0.5)


def pick(page: object, elem_id: str, option: str | None) -> None:
    """Choose an option of a dropdown by (the start of) its label."""
    if option is None:
        return
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=False).first.click()


def save(page: object, path: Path) -> None:
    """A full-page screenshot, reduced to 256 colours (a third of the bytes, same look)."""
    from PIL import Image

    page.screenshot(path=path, full_page=True)
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256)
    small.save(path, optimize=True)


def shoot(url: str, args: argparse.Namespace, out: Path) -> None:
    """Drive both tabs and save the two screenshots."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=300_000)  # samplers on a busy CPU take their time

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(300_000)
        page.goto(url)
        pick(page, "subject", args.subject)
        pick(page, "method", args.method)
        page.click("#generate")
        expect(page.locator("#synth-status")).to_contain_text("wrote the LoRA")
        expect(page.locator("#grid-lora img")).to_be_visible()
        save(page, out / "serve-synthesis.png")
        page.get_by_role("tab", name="Conditioning").click()
        page.locator("#run input").click()
        page.get_by_role("option").filter(has_text=args.run or "").first.click()
        expect(page.locator("#run-info")).to_contain_text("step")
        page.click("#sample")
        expect(page.locator("#cond-grid img")).to_be_visible()
        if page.locator("#sweep").is_visible():
            page.click("#sweep")
            expect(page.locator("#weights-grid img")).to_be_visible()
        save(page, out / "serve-conditioning.png")
        browser.close()


def main() -> None:
    """Parse the options, find or build what the page shows, take the screenshots."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synth", default="runs/synth-demo", help="a finished demo folder")
    p.add_argument("--runs", default="runs", help="folder of `condlora train` runs")
    p.add_argument("--base", help="the demo's base model run (default: found from the demo)")
    p.add_argument("--subject", help="held-out subject to show (default: the first)")
    p.add_argument(
        "--method",
        help="method to write the LoRA with, by (the start of) its name on the page, e.g. "
        "'VAE + prior (AdaNorm), seed 0' (default: the first)",
    )
    p.add_argument("--run", help="run to show (default: the first)")
    p.add_argument("--out", default=str(REPO / "docs"), help="where the PNGs go")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-shots-") as tmp:
        synth, runs = Path(args.synth), Path(args.runs)
        if not (synth / "report.md").is_file():
            print(f"no finished demo in {synth}: building the tiny one", flush=True)
            synth = tiny_demo(Path(tmp) / "demo")
        if not (runs.is_dir() and any(runs.rglob("checkpoint.safetensors"))):
            print(f"no runs in {runs}: training a tiny one", flush=True)
            runs = tiny_run(Path(tmp) / "runs")
        proc, url = start_server(synth, runs, args.base)
        try:
            shoot(url, args, Path(args.out))
        finally:
            proc.send_signal(signal.SIGINT)
            print(f"server exit code {proc.wait(timeout=60)}", flush=True)
    print(f"wrote {args.out}/serve-synthesis.png and serve-conditioning.png")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
