"""Shared fixtures: a tiny digits config so training tests take seconds."""

import copy
import inspect
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from condlora.apps.synthesis_demo.config import tiny as tiny_demo_config
from condlora.apps.synthesis_demo.run import run_demo
from condlora.evaluation.evaluate import CLASSIFIER_FILE
from condlora.image.build import build_data
from condlora.image.config import load_config
from condlora.metrics import save_classifier, train_digits_classifier

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Overrides that shrink any digits config to a model that trains in seconds on a CPU.
TINY = [
    "net.model_channels=8",
    "net.channel_mult=[1, 2]",
    "net.num_blocks=1",
    "net.attn_resolutions=[8]",
    "train.batch_size=16",
    "train.warmup_steps=5",
    "train.log_every=5",
    "train.sample_every=0",
    "train.ckpt_every=0",
    "diffusion.sample_steps=3",
]


# Overrides that shrink the paper's CIFAR-10 configs (ADM: GroupNorm32 needs widths of 32).
TINY_ADM = ["net.model_channels=32", "net.num_blocks=1", "net.channel_mult=[1, 2]"]
TINY_ADM += ["net.attn_resolutions=[16]", "net.dropout=0"]
TINY_EDM = ["net.model_channels=16", "net.num_blocks=1", "net.channel_mult=[1, 2]"]
TINY_EDM += ["net.attn_resolutions=[16]", "net.dropout=0", "lora.mlp_widths=[16, 8]"]
TINY_EDM += ["lora.mlp_groups=4"]


def pytest_sessionstart(session):
    """Print pytest-randomly's seed even under -q, so a failing order can be replayed."""
    seed = getattr(session.config.option, "randomly_seed", None)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if isinstance(seed, int) and reporter is not None:
        reporter.write_line(f"test order shuffled: replay it with --randomly-seed={seed}")


# Markers from what a test does, so a developer can leave a kind out (-m "not browser"):
# `subprocess` (starts other processes), `browser` (drives Chromium), `gpu` (needs CUDA:
# skipped where there is none). `slow` is set by hand on end-to-end tests.
SPAWNS = ("subprocess.", "Popen", "sys.executable", "ProcessPoolExecutor", "run_quickstart(")


def _source(obj: object) -> str:
    """The source of a test or fixture function ('' where there is none)."""
    obj = (
        getattr(obj, "__wrapped__", None)
        or getattr(obj, "_get_wrapped_function", None)
        and (obj._get_wrapped_function())
        or obj
    )
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def pytest_collection_modifyitems(config, items):
    """Add the subprocess / browser markers from the source of each test and the fixtures it
    uses (from its module or this file); skip gpu tests without CUDA."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    here = globals()
    for item in items:
        module = getattr(item, "module", None)
        parts = [getattr(item, "function", None)]
        parts += [
            getattr(module, n, None) or here.get(n) for n in getattr(item, "fixturenames", ())
        ]
        source = "".join(_source(p) for p in parts if p is not None)
        if any(token in source for token in SPAWNS):
            item.add_marker(pytest.mark.subprocess)
        if "playwright" in source:
            item.add_marker(pytest.mark.browser)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_gpu)


def _seed_for(node_id: str) -> None:
    torch.manual_seed(zlib.crc32(node_id.encode()))


# Order-independent randomness: torch's global generator is seeded from the test's (or the
# fixture's) id before each fixture setup and each test call, so what a test draws does not
# depend on which tests ran before it (pytest-randomly shuffles the order in .ci/run).
@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    _seed_for(f"{request.node.nodeid}::{fixturedef.argname}")
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    _seed_for(item.nodeid)
    return (yield)


def assert_same_function(actual, expected):
    """A fresh LoRA (B = 0) on the low-rank path (training, or rows with different
    conditions) computes the base model's function up to the rounding of the stacked [W; A]
    matmul, whose kernel blocking differs from W's alone on some CPUs: this tight tolerance.
    Bit equality holds on the merged path only (no gradients, one condition for the batch)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def tiny_overrides():
    return list(TINY)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a busy machine the waits dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FixedOutput(nn.Module):
    """A "net" that returns a fixed tensor whatever its input (a known eps / v / target)."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, noise_labels):
        return self.out


@pytest.fixture(scope="session")
def classifier_file(tmp_path_factory):
    """A quickly trained digits classifier (experiment and quickstart read it from their folder)."""
    path = tmp_path_factory.mktemp("clf") / CLASSIFIER_FILE
    (images, labels), _ = build_data(load_config(CONFIGS / "digits-baseline.yaml"))
    save_classifier(train_digits_classifier(images, labels, steps=15), path)
    return path


def tiny_unet2d_condition(**changes):
    """A small diffusers UNet2DConditionModel (cross-attention width 8), eval mode, seeded;
    `changes` replace its settings (e.g. SD 2.x's linear projections)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    settings = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    )
    return UNet2DConditionModel(**(settings | changes)).eval()


def merged_by_hand(unet, lora):
    """The reference: a copy of the U-Net with W + dW in every target module."""
    model = copy.deepcopy(unet)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, module in lora.modules.items():
            modules[name].weight += module.delta()
    return model


# the tiny demo's base model: the tiny digits net, trained for 40 steps
TINY_DEMO_BASE = [*TINY, "train.max_steps=40"]


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A finished tiny `condlora synth demo` folder (built once per session; treat it as
    read-only): (folder, demo config, base config)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_demo_config()
        base_cfg = load_config(CONFIGS / "digits-baseline.yaml", TINY_DEMO_BASE)
        out = tmp_path_factory.mktemp("tiny-demo") / "demo"
        run_demo(out, cfg, base_cfg, base_candidates=[], progress=False)
    finally:
        torch.set_num_threads(threads)
    return out, cfg, base_cfg
