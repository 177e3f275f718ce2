"""Fitting a strength schedule for a static LoRA on an image run (image/strength.py)."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from condlora.image.build import build_data, build_denoiser
from condlora.image.config import load_config
from condlora.image.generate import generate, labels_for
from condlora.image.strength import (
    FitSettings,
    attach_schedule,
    fit_schedule,
    read_schedule_into,
    sampler_times,
    write_schedule,
)
from condlora.lora.formats import LoRAWeights, ModuleLoRA

from .conftest import CONFIGS, TINY


def tiny_run():
    """A tiny digits denoiser, its config and a rank-2 LoRA on its attention layers."""
    cfg = load_config(CONFIGS / "digits-baseline.yaml", TINY)
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg).eval()
    with torch.no_grad():  # a fresh net's zero-initialised layers would hide every LoRA
        for p in denoiser.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    modules = {}
    for name, m in denoiser.net.net.named_modules():
        if name.endswith(("qkv", "proj")):
            w = m.weight
            a = torch.randn(2, *w.shape[1:], generator=g) * 0.3
            b = torch.randn(w.shape[0], 2, *[1] * (w.dim() - 2), generator=g) * 0.3
            modules[name] = ModuleLoRA(a, b, 1.0)
    assert modules
    return cfg, denoiser, LoRAWeights(modules)


def merged_by_hand(denoiser, lora, strength):
    model = copy.deepcopy(denoiser)
    layers = dict(model.net.net.named_modules())
    with torch.no_grad():
        for name, module in lora.modules.items():
            layers[name].weight += strength * module.delta()
    return model


def test_sampling_applies_the_schedule_ones_static_lora_zeros_base_model():
    cfg, denoiser, lora = tiny_run()
    base = copy.deepcopy(denoiser)
    static = merged_by_hand(denoiser, lora, 1.0)
    schedule = attach_schedule(denoiser, lora, bins=4)
    labels = labels_for(cfg, 6)

    def draw(model):
        return generate(model, cfg, 6, labels, steps=3, seed=2)

    with_lora, without = draw(static), draw(base)
    assert (with_lora - without).abs().max() > 0.05  # the LoRA changes the samples
    assert torch.allclose(draw(denoiser), with_lora, atol=1e-4)  # all ones: the LoRA
    with torch.no_grad():
        schedule.table.zero_()
    assert torch.equal(draw(denoiser), without)  # zeros: the base model, bit for bit


@pytest.mark.slow
def test_fit_trains_only_the_table_and_preservation_pulls_it_towards_the_base():
    cfg, denoiser, lora = tiny_run()
    (images, labels), _ = build_data(cfg)
    schedule = attach_schedule(denoiser, lora, bins=4, per_block=True)
    frozen = {k: v.clone() for k, v in denoiser.state_dict().items()}
    settings = FitSettings(steps=40, lr=0.05, batch=16, weight=50.0)
    log = fit_schedule(denoiser, schedule, images[:64], labels[:64], settings)
    assert [r["step"] for r in log] == list(range(1, 41))
    state = denoiser.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # base untouched
    assert schedule.table.mean() < 0.8  # started at 1; the base's predictions pull it down
    early = sum(r["preserve"] for r in log[:5]) / 5
    late = sum(r["preserve"] for r in log[-5:]) / 5
    assert late < early  # the preservation term falls as the table learns


def test_a_written_schedule_reads_back_into_the_same_lora(tmp_path):
    cfg, denoiser, lora = tiny_run()
    schedule = attach_schedule(denoiser, lora, bins=5, per_block=True)
    with torch.no_grad():
        schedule.table.copy_(torch.rand(schedule.table.shape))
    ts = sampler_times(denoiser, cfg.diffusion.sample_steps)
    write_schedule(schedule, tmp_path, ts, {"lora": "test"})
    for name in ("schedule.safetensors", "schedule.csv", "keyframes.json", "schedule.png"):
        assert (tmp_path / name).is_file()
    assert len((tmp_path / "schedule.csv").read_text().splitlines()) == len(ts) + 1
    _, other, _ = tiny_run()
    again = attach_schedule(other, lora, bins=5, per_block=True)
    read_schedule_into(again, tmp_path / "schedule.safetensors")
    assert torch.equal(again.table, schedule.table)


def digit_folder(root, images, labels, flat=False):
    """The images as PNGs, in one subfolder per class (or flat)."""
    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root if flat else root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((image[0] + 1) * 127.5).clamp(0, 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"{k}.png")
    return root


@pytest.mark.slow
def test_schedule_fit_command_writes_its_files_and_refuses_a_flat_folder(tmp_path, capsys):
    from condlora.cli import main
    from condlora.image.task import train
    from condlora.lora.formats import write_lora

    cfg, _, _ = tiny_run()
    train(
        load_config(CONFIGS / "digits-baseline.yaml", [*TINY, "train.max_steps=2"]),
        tmp_path / "run",
        progress=False,
    )
    _, denoiser, lora = tiny_run()
    write_lora(lora, tmp_path / "lora", "peft")
    (images, labels), _ = build_data(cfg)
    data = digit_folder(tmp_path / "data", images[:20], labels[:20])
    argv = ["schedule", "fit", "--base", str(tmp_path / "run"), "--lora", str(tmp_path / "lora")]
    argv += ["--data", str(data), "--steps", "2", "--batch", "4", "--blocks"]
    assert main([*argv, "--out", str(tmp_path / "s")]) == 0
    written = ("schedule.safetensors", "schedule.csv", "keyframes.json", "schedule.png")
    for name in (*written, "diffusers_callback.py"):
        assert (tmp_path / "s" / name).is_file()
    flat = digit_folder(tmp_path / "flat", images[:4], labels[:4], flat=True)
    argv[argv.index("--data") + 1] = str(flat)
    assert main([*argv, "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give the images in class subfolders" in err[0]
    assert not (tmp_path / "t").exists()

    # sampling applies the LoRA at the fitted schedule, or at a constant strength
    def sample(out, *extra):
        argv = ["sample", "--run", str(tmp_path / "run"), "--num", "4", "--out", str(out)]
        return main([*argv, "--steps", "2", *extra])

    lora_args = ["--lora", str(tmp_path / "lora")]
    assert sample(tmp_path / "fitted.png", *lora_args, "--schedule", str(tmp_path / "s")) == 0
    assert sample(tmp_path / "base.png") == 0
    assert sample(tmp_path / "zero.png", *lora_args, "--strength", "0") == 0
    assert sample(tmp_path / "one.png", *lora_args, "--strength", "1") == 0
    pixels = {n: np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("base", "zero", "one")}
    assert np.array_equal(pixels["zero"], pixels["base"])  # strength 0: the base model
    assert not np.array_equal(pixels["one"], pixels["base"])  # the LoRA changes the samples
    capsys.readouterr()
    assert sample(tmp_path / "x.png", "--schedule", str(tmp_path / "s")) == 2
    assert "give the LoRA too" in capsys.readouterr().err


def test_one_fit_step_logs_the_loss_and_the_distance_to_the_base_models_own_prediction():
    cfg, denoiser, lora = tiny_run()
    base = copy.deepcopy(denoiser)
    static = merged_by_hand(denoiser, lora, 1.0)
    (images, labels), _ = build_data(cfg)
    schedule = attach_schedule(denoiser, lora, bins=3)
    settings = FitSettings(steps=1, batch=8, seed=4, sampler_steps=cfg.diffusion.sample_steps)
    (record,) = fit_schedule(denoiser, schedule, images[:20], labels[:20], settings)
    # the same draws, written out: batch, grid sigmas, noise; then both backbones plainly
    gen = torch.Generator().manual_seed(4)
    idx = torch.randint(20, (8,), generator=gen)
    grid = denoiser.precond.sampling_sigmas(cfg.diffusion.sample_steps)[:-1]
    sigma = grid[torch.randint(len(grid), (8,), generator=gen)]
    noise = torch.randn(images[idx].shape, generator=gen)
    x0, y = images[idx], labels[idx]
    c_in = denoiser.precond.scalings(sigma)[2].reshape(-1, 1, 1, 1)
    x_in, label = (
        c_in * (x0 + sigma.reshape(-1, 1, 1, 1) * noise),
        denoiser.precond.noise_label(sigma),
    )
    with torch.no_grad():
        fit = static.loss(x0, sigma=sigma, noise=noise, class_labels=y)
        keep = static.net(x_in, label, class_labels=y) - base.net(x_in, label, class_labels=y)
    assert record["fit"] == pytest.approx(float(fit), rel=1e-4)
    assert record["preserve"] == pytest.approx(float(keep.square().mean()), rel=1e-4)
    assert record["preserve"] > 0


def test_schedule_fit_on_a_diffusers_folder_as_it_is(tmp_path, capsys):
    """`--base` a diffusers pipeline folder: the LoRA names the U-Net's own modules, and a
    schedule at strength 1 computes W + dW by hand."""
    diffusers = pytest.importorskip("diffusers")
    from condlora.cli import main
    from condlora.image.strength import lora_with_schedule
    from condlora.image.task import load_base
    from condlora.lora.formats import write_lora

    from .test_diffusers_arch import tiny_pipeline

    root = tiny_pipeline(tmp_path / "pipe")
    unet = diffusers.UNet2DModel.from_pretrained(root / "unet")
    g = torch.Generator().manual_seed(2)
    modules = {
        name: ModuleLoRA(
            torch.randn(2, m.weight.shape[1], generator=g) * 0.3,
            torch.randn(m.weight.shape[0], 2, generator=g) * 0.3,
            1.0,
        )
        for name, m in unet.named_modules()
        if name.endswith(("to_q", "to_v"))
    }
    write_lora(LoRAWeights(modules), tmp_path / "lora", "diffusers")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16), dtype=np.uint8)
        Image.fromarray(pixels, "L").save(data / f"{i}.png")
    argv = ["schedule", "fit", "--base", str(root), "--lora", str(tmp_path / "lora")]
    argv += ["--data", str(data), "--steps", "2", "--batch", "4"]
    assert main([*argv, "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "schedule.safetensors").is_file()
    assert (tmp_path / "s" / "diffusers_callback.py").is_file()

    cfg, denoiser = load_base(root, data)
    assert cfg.net.arch == "diffusers" and cfg.diffusion.objective == "ddpm"
    by_hand = copy.deepcopy(denoiser)
    layers = dict(by_hand.net.net.unet.named_modules())
    with torch.no_grad():
        for name, module in modules.items():
            layers[name].weight += module.delta()
    lora_with_schedule(denoiser, tmp_path / "lora", strength=1.0)
    x = torch.randn(2, 1, 16, 16, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x, 3.0), by_hand(x, 3.0), atol=1e-5, rtol=1e-5)
        base = load_base(root, data)[1]
        assert (denoiser(x, 3.0) - base(x, 3.0)).abs().max() > 1e-3  # the LoRA acts

    # a LoRA on a module the U-Net does not have: one line, exit 2, nothing written
    bad = {"down_blocks.7.attentions.0.to_q": next(iter(modules.values()))}
    write_lora(LoRAWeights(bad), tmp_path / "bad", "diffusers")
    capsys.readouterr()
    argv[argv.index("--lora") + 1] = str(tmp_path / "bad")
    assert main([*argv, "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("condlora: error:")
    assert not (tmp_path / "t").exists()
