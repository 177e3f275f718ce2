"""The paper's objectives on tiny versions of the paper's networks: IDDPM (hybrid loss,
respaced sampling) on the ADM U-Net, EDM (Heun, augmentation) on DDPM++."""

import json

import pytest
import torch

from condlora.cli import main
from condlora.data import load_digits_images
from condlora.diffusion import IDDPMDenoiser, sample
from condlora.image.build import build_denoiser
from condlora.image.config import load_config
from tests import conftest
from tests.conftest import CONFIGS

DIGITS_32 = ["data.name=digits", "data.resolution=32", "data.path=null"]
TINY_ADM = [*conftest.TINY_ADM, *DIGITS_32]  # the paper nets, tiny, on 32x32 digits
TINY_EDM = [*conftest.TINY_EDM, *DIGITS_32]


@torch.no_grad()
def fixed_loss(denoiser, x0, y, iddpm: bool) -> float:
    """The loss at fixed noise and noise levels (no sampling noise between calls)."""
    g = torch.Generator().manual_seed(123)
    n = len(x0)
    noise = torch.randn(x0.shape, generator=g)
    if iddpm:  # timesteps spread over the chain, clear of the spiky last one
        steps = torch.linspace(0, 3990, n).long()
        return float(denoiser.loss(x0, noise=noise, timesteps=steps, class_labels=y))
    sigma = torch.logspace(-1.5, 1.2, n)
    return float(denoiser.loss(x0, noise=noise, sigma=sigma, class_labels=y))


@pytest.mark.parametrize(
    "config, tiny",
    [("cifar10-iddpm-cond-lora.yaml", TINY_ADM), ("cifar10-edm-cond-lora.yaml", TINY_EDM)],
)
@pytest.mark.slow
def test_objective_trains_tiny_paper_net_and_samples(config, tiny, one_thread):
    iddpm = "iddpm" in config
    cfg = load_config(CONFIGS / config, tiny)
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg)
    assert isinstance(denoiser, IDDPMDenoiser) == iddpm
    images, labels = load_digits_images(32)
    x0, y = images[:16], labels[:16]
    before = fixed_loss(denoiser, x0, y, iddpm)
    opt = torch.optim.Adam(denoiser.parameters(), lr=2e-3)
    for _ in range(50):
        denoiser.loss(x0, class_labels=y).backward()
        opt.step()
        opt.zero_grad()
    after = fixed_loss(denoiser, x0, y, iddpm)
    assert after < 0.7 * before, (before, after)
    sampler = "iddpm" if iddpm else "heun"
    with torch.no_grad():
        out = sample(denoiser.eval(), (4, 1, 32, 32), sampler=sampler, steps=5, class_labels=y[:4])
    assert out.shape == (4, 1, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "config, tiny, extra",
    [
        ("cifar10-iddpm-uncond-onlylora.yaml", TINY_ADM, ["diffusion.sample_steps=4"]),
        ("cifar10-edm-cond-onlylora.yaml", TINY_EDM, ["diffusion.sample_steps=3"]),
    ],
)
@pytest.mark.slow
def test_cli_trains_paper_config_with_its_sampler_and_augmentation(
    config, tiny, extra, tmp_path, one_thread
):
    run = tmp_path / "run"
    common = ["train.batch_size=8", "train.log_every=2", "train.sample_every=0"]
    args = ["train", "--config", str(CONFIGS / config), "--out", str(run), "--max-steps", "4"]
    assert main([*args, "--quiet", *tiny, *common, *extra]) == 0
    saved = load_config(run / "config.yaml")
    assert saved.train.augment_p == (0.12 if "edm" in config else 0.0)
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(r["loss"] > 0 for r in log)
    assert (run / "samples" / "step_0000004.png").is_file()


def test_augmentation_needs_the_augment_label(tmp_path, capsys):
    args = ["train", "--config", str(CONFIGS / "cifar10-iddpm-uncond-baseline.yaml")]
    assert main([*args, "--out", str(tmp_path / "r"), *TINY_ADM, "train.augment_p=0.1"]) == 2
    assert "augment_dim" in capsys.readouterr().err
