"""`condlora serve`: the page's work (uploads, downloads, demo, runs) and the page itself,
driven by a real headless browser (playwright with the system's Chromium)."""

import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from condlora.apps.serve import uploads
from condlora.apps.serve.conditioning import RunCache, class_grid, find_runs, sweep, weighted_grid
from condlora.apps.serve.plots import pca_2d, project
from condlora.apps.serve.server import load_demo
from condlora.apps.serve.synthesis import GRID_ROWS, SynthDemo
from condlora.apps.serve.synthesis_page import lora_download
from condlora.core.errors import CondloraError, DataError
from condlora.image.config import load_config
from condlora.image.generate import generate
from condlora.image.task import train_or_reuse
from condlora.lora.formats import read_lora
from condlora.synthesis.collection import LoRADataset

from .conftest import CONFIGS, TINY

# the demo's generative models, one folder per seed (synthesis/demo/generative.py)
# the page needs trained runs and the tiny demo: seconds to build, so the slow tier
pytestmark = pytest.mark.slow

GENERATIVE_SLUGS = (
    "raw-diffusion-adalora",
    "vae-prior-adalora",
    "vae-prior-adanorm",
    "vae-prior-uc-lora",
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def delta(weights):
    """module -> dW = scale * B A (conv factors flattened): what a LoRA computes."""
    out = {}
    for name, m in weights.modules.items():
        a, b = m.A.reshape(m.A.shape[0], -1), m.B.reshape(m.B.shape[0], -1)
        out[name] = m.scale * b.double() @ a.double()
    return out


def assert_same_update(got, want):
    got, want = delta(got), delta(want)
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5), name


def nearest_training_lora(folder: Path, subject: str):
    """The training LoRA whose subject's embedding has the largest cosine with `subject`'s,
    read plainly from the demo's files."""
    from safetensors.torch import load_file

    query = load_file(folder / "embeddings.safetensors")[subject]
    train = LoRADataset(folder / "dataset" / "train.safetensors")
    keys = torch.from_numpy(np.array(train.embeddings))
    cosines = [float(k @ query / (k.norm() * query.norm())) for k in keys]
    return train.lora(int(np.argmax(cosines)))


# ---------------------------------------------------------------- uploads


def _png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def _png_header(path: Path, width: int, height: int) -> Path:
    """A small PNG file whose header declares width x height grey pixels (the data is short)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    data = chunk(b"IDAT", zlib.compress(bytes(16))) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + data)
    return path


def _stroke(size: int = 64, dark_on_light: bool = True) -> np.ndarray:
    """A vertical bar off-centre, 8 px wide, as a photo of a '1' on paper would be."""
    ink = np.zeros((size, size), dtype=np.uint8)
    ink[10:50, 40:48] = 255
    return 255 - ink if dark_on_light else ink


def test_bad_uploads_are_refused_in_one_line_naming_the_file(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(DataError, match="notes.png is not an image"):
        uploads.load_uploads([text], 16)
    tiny = _png(tmp_path / "tiny.png", np.zeros((4, 40), dtype=np.uint8))
    with pytest.raises(DataError, match="tiny.png is 40 x 4 pixels"):
        uploads.load_uploads([tiny], 16)
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(uploads.MAX_BYTES))
    with pytest.raises(DataError, match="big.png is too large"):
        uploads.load_uploads([big], 16)
    good = _png(tmp_path / "one.png", _stroke())
    with pytest.raises(DataError, match="too many images: 33"):
        uploads.load_uploads([good] * (uploads.MAX_FILES + 1), 16)
    with pytest.raises(DataError, match="no images"):
        uploads.load_uploads([], 16)
    blank = _png(tmp_path / "blank.png", np.full((20, 20), 255, dtype=np.uint8))
    with pytest.raises(DataError, match="blank.png is blank"):
        uploads.load_uploads([blank], 16)
    bomb = _png_header(tmp_path / "bomb.png", 60000, 60000)  # PIL's decompression-bomb guard
    with pytest.raises(DataError, match="bomb.png is too large: more than .* pixels"):
        uploads.load_uploads([bomb], 16)


def test_a_picture_becomes_a_centred_bright_digit_whatever_its_paper(tmp_path):
    dark = uploads.load_uploads([_png(tmp_path / "a.png", _stroke())], 16)
    light = uploads.load_uploads([_png(tmp_path / "b.png", _stroke(dark_on_light=False))], 16)
    assert dark.shape == (1, 1, 16, 16)
    assert torch.allclose(dark, light, atol=1e-6)  # ink is ink, on light or dark paper
    digit = dark[0, 0]
    assert float(digit.max()) == 1.0 and float(digit.min()) == -1.0
    ink = (digit > 0).nonzero().float()
    # the 40 x 8 bar fills the square's height but for the margins, centred
    rows = int(ink[:, 0].max() - ink[:, 0].min()) + 1
    assert abs(rows - 16 * (1 - 2 * uploads.MARGIN)) <= 1.5
    assert abs(float(ink.mean(0)[0]) - 7.5) <= 0.6 and abs(float(ink.mean(0)[1]) - 7.5) <= 0.6
    assert (digit[:, :3] == -1).all() and (digit[:, -3:] == -1).all()  # background left and right


def test_a_canvas_is_read_as_ink_on_paper_and_an_empty_one_as_nothing():
    canvas = np.zeros((64, 64, 4), dtype=np.uint8)  # transparent everywhere: white paper
    assert uploads.drawing_grey({"composite": canvas}) is None
    canvas[10:50, 30:36] = (0, 0, 0, 255)  # a black stroke
    grey = uploads.drawing_grey({"composite": canvas})
    assert grey[20, 32] == 0.0 and grey[0, 0] == 1.0
    digit = uploads.to_digit(grey, 16)
    assert digit.shape == (1, 16, 16) and float(digit.max()) == 1.0


# ---------------------------------------------------------------- downloads


@pytest.mark.parametrize("layout", ["peft", "diffusers", "kohya"])
def test_a_download_reads_back_as_the_same_lora(tmp_path, layout):
    from .synth_common import SPEC

    vector = torch.randn(SPEC.size, generator=torch.Generator().manual_seed(1))
    weights = SPEC.unflatten(vector)
    path = lora_download(weights, layout, tmp_path / "downloads", "s0001/pca ridge")
    assert path.parent.parent == tmp_path / "downloads"
    suffix = ".zip" if layout == "peft" else ".safetensors"
    assert path.name == f"s0001_pca_ridge-{layout}{suffix}"
    if layout == "peft":
        with zipfile.ZipFile(path) as archive:
            archive.extractall(tmp_path / "unzipped")
        path = tmp_path / "unzipped" / f"s0001_pca_ridge-{layout}"
    base = SPEC.modules if layout == "kohya" else None  # kohya names need the base's modules
    assert_same_update(read_lora(path, base), weights)


# ---------------------------------------------------------------- the PCA plot


def test_pca_plane_matches_the_covariance_eigenvectors():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0)) * torch.arange(1.0, 7.0)
    mean, components = pca_2d(x)
    centred = (x - x.mean(0)).double().numpy()
    values, vectors = np.linalg.eigh(centred.T @ centred)
    top = vectors[:, np.argsort(values)[::-1][:2]]  # the two largest-variance directions
    got = project(x, mean, components).numpy()
    want = centred @ top
    for k in range(2):  # up to the sign of each direction
        assert np.allclose(np.abs(got[:, k]), np.abs(want[:, k]), atol=1e-8)


# ---------------------------------------------------------------- the demo folder


def test_the_demo_writes_the_nearest_lora_and_samples_with_common_noise(tiny_demo, one_thread):
    from condlora.apps.synthesis_demo.zoo import make_subjects

    folder, cfg = tiny_demo[:2]
    demo = SynthDemo(folder)
    assert demo.methods()[:2] == ["pca-ridge", "nearest"]
    assert all(m.endswith("-seed0") for m in demo.methods()[2:])  # the first seed's models
    split = make_subjects(cfg, 0)  # the first seed's split: its test subjects are shown
    test, train = [split.names[i] for i in split.heldout], split.names[split.train[0]]
    assert [name for _, name in demo.heldout_subjects()] == test
    written = demo.write_lora("nearest", demo.subject_embedding(test[1]))
    assert_same_update(written.weights, nearest_training_lora(folder, test[1]))
    base = demo.samples(None, seed=3)
    assert base.shape == (10 * GRID_ROWS, 1, 16, 16)
    assert torch.equal(base, demo.samples(None, seed=3))
    zero = demo.data.spec.unflatten(torch.zeros(demo.data.spec.size))
    assert torch.allclose(demo.samples(zero, seed=3), base, atol=1e-5)  # same noise, no LoRA
    assert not torch.allclose(demo.samples(demo.finetuned(test[1]), seed=3), base, atol=1e-3)
    assert demo.finetuned(train) is None  # a training subject has no held-out ceiling
    with pytest.raises(DataError, match="unknown method"):
        demo.write_lora("magic", demo.subject_embedding(test[1]))


def test_trained_synthesis_models_of_the_demo_are_methods_too(tmp_path, tiny_demo, one_thread):
    from condlora.synthesis.config import load_synth_config
    from condlora.synthesis.training import train_baseline

    folder = tmp_path / "demo"
    shutil.copytree(tiny_demo[0], folder)
    dataset = folder / "dataset" / "train.safetensors"
    cfg = load_synth_config(None, ["method=nearest", f"dataset={dataset}"])
    train_baseline(cfg, folder / "methods" / "nearest-model")
    # the demo's VAEs alone (vae-seedS, shared by its latent priors) are no method
    assert (folder / "methods" / "vae-seed0" / "model.safetensors").is_file()
    demo = SynthDemo(folder)
    # the first seed's models: the other seeds' read their own encoders
    trained = [f"{slug}-seed0" for slug in GENERATIVE_SLUGS]
    assert demo.methods() == ["pca-ridge", "nearest", *sorted([*trained, "nearest-model"])]
    written = demo.write_lora("nearest-model", demo.subject_embedding("s0006"), seed=1)
    assert_same_update(written.weights, nearest_training_lora(folder, "s0006"))
    # a generative model of the demo writes a LoRA of the collection's layout
    made = demo.write_lora("vae-prior-adalora-seed0", demo.subject_embedding("s0006"), seed=1)
    assert set(made.weights.modules) == set(written.weights.modules)


def test_a_missing_or_foreign_demo_folder_is_one_clear_line(tmp_path, tiny_demo):
    demo, problem = load_demo([tmp_path / "nowhere"], None, explicit=False)
    assert demo is None and "condlora synth demo" in problem and str(tmp_path) in problem
    with pytest.raises(DataError, match="demo folder not found"):
        load_demo([tmp_path / "nowhere"], None, explicit=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no demo.json"):
        SynthDemo(tmp_path / "empty")
    with pytest.raises(CondloraError, match="no finished run|run folder"):
        SynthDemo(tiny_demo[0], base=tmp_path / "empty")


def test_the_page_names_methods_as_the_report_and_says_what_its_times_are(tiny_demo, one_thread):
    from condlora.apps.serve.synthesis_page import timing_line

    folder = tiny_demo[0]
    demo = SynthDemo(folder)
    report = (folder / "report.md").read_text()
    labels = {m: demo.label(m) for m in demo.methods()}
    assert labels["vae-prior-adalora-seed0"] == "VAE + prior (ADALoRA), seed 0"
    assert labels["raw-diffusion-adalora-seed0"] == "raw diffusion (ADALoRA), seed 0"
    assert all(m.endswith("seed0") for m in labels if "seed" in m)  # the first seed's models
    for label in labels.values():  # every name is a row of the report's table
        assert f"| {label.split(', seed')[0]} |" in report
    e = demo.subject_embedding("s0006")
    first, again = demo.write_lora("nearest", e), demo.write_lora("nearest", e)
    assert (first.ready, again.ready, again.ready_seconds) == ("fitted", "cached", 0.0)
    loaded = demo.write_lora("vae-prior-adanorm-seed0", e)
    assert loaded.ready == "loaded" and loaded.ready_seconds > 0
    line = timing_line(demo.label(loaded.method), loaded)
    assert line.startswith("**VAE + prior (AdaNorm), seed 0** wrote the LoRA in ")
    assert "s per LoRA" in line and "method was loaded from its trained model first, in " in line
    assert "fitted on the training collection first" in timing_line("nearest", first)
    assert "first" not in timing_line("nearest", again)  # no 0.00 s for a cached method


def test_synth_generate_with_the_digits_encoder_gives_the_pages_embedding(
    tmp_path, tiny_demo, one_thread, capsys
):
    from condlora.cli import main
    from condlora.synthesis.config import load_synth_config
    from condlora.synthesis.encoders import subject_embedding
    from condlora.synthesis.training import train_baseline

    folder = tiny_demo[0]
    demo = SynthDemo(folder)
    images = tmp_path / "mine"
    images.mkdir()
    for i, digit in enumerate(demo.styled_digits("s0007")[:4]):  # dark strokes on white paper
        grey = ((1 - digit[0].numpy()) * 127.5).clip(0, 255).astype(np.uint8)
        Image.fromarray(np.kron(grey, np.ones((4, 4), dtype=np.uint8))).save(images / f"{i}.png")
    files = sorted(images.iterdir())
    page = demo.embed(uploads.load_uploads(files, demo.resolution))  # what the page computes
    for path in (folder / "encoder.safetensors", folder):
        encoder = uploads.DigitsEncoder(path)  # `condlora` registers it as kind "digits"
        assert torch.allclose(subject_embedding(encoder, images), page, atol=1e-6)
    dataset = folder / "dataset" / "train.safetensors"
    model = tmp_path / "nearest-model"
    train_baseline(load_synth_config(None, ["method=nearest", f"dataset={dataset}"]), model)
    args = ["synth", "generate", "--model", str(model), "--images", str(images)]
    args += ["--encoder", "digits", "--out", str(tmp_path / "lora")]
    assert main(args) == 2  # no encoder file: one line saying what to give
    assert "needs --encoder-path" in capsys.readouterr().err
    assert main([*args, "--encoder-path", str(folder / "encoder.safetensors")]) == 0
    train = LoRADataset(dataset)
    keys = torch.from_numpy(np.array(train.embeddings))
    best = int(np.argmax([float(k @ page / (k.norm() * page.norm())) for k in keys]))
    assert_same_update(read_lora(tmp_path / "lora"), train.lora(best))


# ---------------------------------------------------------------- runs of condlora train


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """A folder holding one tiny ClassLoRA + TimeLoRA run (10 steps) and one foreign file."""
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(CONFIGS / "digits-classlora.yaml", [*TINY, "train.max_steps=10"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_or_reuse(cfg, root / "classlora", progress=False)
    finally:
        torch.set_num_threads(threads)
    (root / "notes" / "deep").mkdir(parents=True)
    (root / "notes" / "deep" / "checkpoint.safetensors").write_text("not a checkpoint")
    return root


def test_runs_are_found_and_sampled_with_class_weights(runs_root, one_thread):
    assert find_runs(runs_root) == ["classlora"]  # the damaged checkpoint is left out
    run = RunCache(runs_root).get("classlora")
    assert run.classes == 10 and run.class_lora and len(run.tables()) > 0
    images, columns = class_grid(run, None, 1.0, 3, seed=2, per_row=2)
    assert images.shape == (20, 1, 16, 16) and columns == 2
    one_hot = weighted_grid(run, {7: 1.0}, 1.0, 3, seed=2, count=2)
    labels = torch.full((2,), 7)
    plain = generate(run.denoiser, run.cfg, 2, labels, steps=3, seed=2)
    assert torch.allclose(one_hot, plain, atol=1e-5)  # weight 1 on a class is that class
    path, cols = sweep(run, 7, 1, 1.0, 3, seed=2, rows=2)
    assert cols == 9 + 4 and path.shape == (2 * cols, 1, 16, 16)
    assert torch.allclose(path.reshape(2, cols, 1, 16, 16)[:, 0], plain, atol=1e-5)
    with pytest.raises(DataError, match="class 12 is not one of"):
        class_grid(run, 12, 1.0, 3, seed=0, per_row=1)
    with pytest.raises(DataError, match="no run"):
        RunCache(runs_root).get("../elsewhere")


# ---------------------------------------------------------------- the command


def test_serve_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    from condlora.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a)
    )
    assert main(["serve", "--port", "7861"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "condlora: error: condlora serve needs gradio (the demo extra): pip install -e '.[demo]'"
    ]


def test_serve_looks_for_the_demo_then_the_quick_demo(tmp_path, monkeypatch):
    from condlora.apps.serve import server, synthesis
    from condlora.cli import main

    given = []
    monkeypatch.setattr(server, "serve", lambda runs, synth, *a, **k: given.append(synth))
    monkeypatch.chdir(tmp_path)
    assert main(["serve"]) == 0
    looked = [Path("runs/synth-demo"), Path("runs/synth-demo-quick")]
    assert given == [looked]
    demo, problem = load_demo(looked, None, explicit=False)  # neither there: where it looked
    assert demo is None
    assert "no digits demo in runs/synth-demo or runs/synth-demo-quick" in problem
    assert "condlora synth demo --quick" in problem
    opened = []
    monkeypatch.setattr(synthesis, "SynthDemo", lambda folder, base: opened.append(folder))
    (tmp_path / "runs" / "synth-demo-quick").mkdir(parents=True)
    assert load_demo(looked, None, explicit=False)[1] == ""
    (tmp_path / "runs" / "synth-demo").mkdir()
    load_demo(looked, None, explicit=False)
    assert opened == looked[::-1]  # the quick demo alone, then the full one first
    assert main(["serve", "--synth", "elsewhere"]) == 0
    assert given[-1] == [Path("elsewhere")]


def test_serve_on_a_host_it_cannot_use_says_why_in_one_line(tmp_path, capsys):
    from condlora.cli import main

    runs = ["--runs", str(tmp_path)]
    assert main(["serve", "--host", "no.such.host.invalid", *runs]) == 2
    assert "no.such.host.invalid:7860: the host cannot be resolved" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--port", port, *runs]) == 2
    assert f"127.0.0.1:{port}: the port is in use" in capsys.readouterr().err


def test_a_sigterm_while_the_page_is_built_deletes_the_temporary_folder(tmp_path):
    """SIGTERM as soon as the temporary folder exists (gradio still loading): a clean stop."""
    tmp, runs = tmp_path / "tmp", tmp_path / "runs"
    tmp.mkdir(), runs.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "condlora.cli", "serve", "--port", str(free_port())]
    proc = subprocess.Popen(
        [*cmd, "--runs", str(runs)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 60
    while not list(tmp.glob("condlora-serve-*")) and proc.poll() is None:
        assert time.time() < deadline, "serve made no temporary folder"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, output
    assert "stopped" in output and not list(tmp.iterdir()), output


# ---------------------------------------------------------------- the page in a browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, tiny_demo, runs_root):
    """`condlora serve` in a subprocess on a free port, its temporary folder under tmp_path."""
    port = free_port()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "condlora.cli", "serve", "--port", str(port)]
    cmd += ["--synth", str(tiny_demo[0]), "--runs", str(runs_root)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("the server did not start:\n" + proc.stdout.read().decode()[-3000:])
            time.sleep(0.3)
    yield url, tmp
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert not list(tmp.iterdir())  # all the server wrote was in its folder, deleted on exit


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (CI installs it: apt-get)")
def test_the_page_writes_a_lora_for_a_held_out_subject_and_refuses_a_bad_upload(
    server, tiny_demo, tmp_path
):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # samplers on a busy CPU take their time

    url, tmp = server
    folder = tiny_demo[0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page()
        page.set_default_timeout(60_000)
        page.goto(url)
        # a held-out subject, the nearest method, generate
        page.locator("#subject input").click()
        page.get_by_role("option", name="s0006", exact=False).click()
        page.locator("#method input").click()
        page.get_by_role("option", name="nearest", exact=True).click()
        page.click("#generate")
        expect(page.locator("#synth-status")).to_contain_text("nearest wrote the LoRA")
        grid = page.locator("#grid-lora img")
        expect(grid).to_be_visible()
        expect(page.locator("#grid-finetuned img")).to_be_visible()
        png = Image.open(io.BytesIO(page.request.get(grid.get_attribute("src")).body()))
        assert png.size == ((10 * 17 + 1) * 6, (GRID_ROWS * 17 + 1) * 6)  # 10 x 3 digits, x6
        # the download is a peft LoRA that condlora reads: the nearest training subject's
        with page.expect_download() as download:
            page.click("#download")
        assert download.value.suggested_filename == "s0006-nearest-peft.zip"
        download.value.save_as(tmp_path / "lora.zip")
        with zipfile.ZipFile(tmp_path / "lora.zip") as archive:
            archive.extractall(tmp_path / "lora")
        got = read_lora(tmp_path / "lora" / "s0006-nearest-peft")
        assert_same_update(got, nearest_training_lora(folder, "s0006"))
        # a file that is not an image: a clear line on the page, kept in the server's folder
        (tmp_path / "notes.png").write_text("this is not an image")
        page.click("#mine")
        page.locator("#uploads input[type=file]").set_input_files(tmp_path / "notes.png")
        expect(page.locator("#synth-status")).to_contain_text("notes.png is not an image")
        assert "Traceback" not in page.content()
        kept = list(tmp.glob("condlora-serve-*/uploads/**/notes.png"))
        assert kept and all(tmp in p.parents for p in kept)
        # the conditioning tab: the run's ClassLoRA controls and a class grid
        page.get_by_role("tab", name="Conditioning").click()
        page.locator("#run input").click()
        page.get_by_role("option", name="classlora").click()
        expect(page.locator("#run-info")).to_contain_text("time+class")
        expect(page.locator("#weight-a")).to_be_visible()
        page.click("#sample")
        expect(page.locator("#cond-grid img")).to_be_visible()
        browser.close()
