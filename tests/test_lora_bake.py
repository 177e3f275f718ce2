"""`condlora lora bake`: a run's conditional LoRA as static files that diffusers and peft load,
equal to dW(t) where the composition is constant over the baked range."""

import csv

import pytest
import torch

from condlora.cli import main
from condlora.core.safetensors_io import read_weights, write_weights
from condlora.image.bake import basis_weights, label_of_time, levels_in
from condlora.image.task import load_run, train
from condlora.lora.formats import read_lora
from condlora.lora.runtime import lora_layers
from condlora.train.checkpoint import EMA_NAME

from .test_diffusers_arch import config, tiny_pipeline

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from diffusers.loaders import StableDiffusionLoraLoaderMixin as Pipeline  # noqa: E402
from diffusers.loaders.peft import PeftAdapterMixin  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

EDGE = 0.4  # the composition is made constant on t in [0, EDGE]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A TimeLoRA run on a tiny diffusers UNet2DModel whose tables hold one row on
    t <= EDGE (and random B), so dW(t) is constant there and nonzero."""
    root = tmp_path_factory.mktemp("bake")
    pipe = tiny_pipeline(root / "pipe")
    train(config(pipe, "lora.num_bases=3"), root / "run", progress=False)
    path = root / "run" / EMA_NAME
    meta, tensors = read_weights(path, None, "ema", RuntimeError)
    g = torch.Generator().manual_seed(0)
    edge = round(EDGE * 999)
    for key, value in tensors.items():
        if key.endswith("omega"):
            value[: edge + 1] = torch.rand(3, generator=g)  # one row on [0, EDGE]
        if key.endswith("lora_B"):
            value.copy_(torch.randn(value.shape, generator=g))
    write_weights(path, tensors, meta)
    return root


def lora_unet(pipe):
    """The pipeline's UNet2DModel with diffusers' adapter methods (what a pipeline's
    load_lora_weights calls: UNet2DModel itself does not carry them)."""
    unet = diffusers.UNet2DModel.from_pretrained(pipe / "unet")
    unet.__class__ = type("LoRAUNet2DModel", (PeftAdapterMixin, diffusers.UNet2DModel), {})
    return unet


def delta_at(run_dir, t):
    """dW(t) of every wrapped layer of the run, by U-Net module name."""
    cfg, denoiser, _ = load_run(run_dir)
    w = basis_weights(denoiser, cfg, torch.tensor([t]), None)
    layers = lora_layers(denoiser.net.net)
    with torch.no_grad():
        return {n.removeprefix("unet."): layers[n].get_delta_weight(w[n]) for n in layers}


def assert_close_deltas(got, want):
    assert sorted(got) == sorted(want)
    for name, delta in want.items():
        err = float((got[name] - delta).detach().norm() / delta.norm())
        assert err < 1e-5, (name, err)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_a_baked_file_loads_in_diffusers_and_is_dw_of_the_range(run, layout, tmp_path, capsys):
    out = tmp_path / ("baked" if layout == "diffusers" else "baked.safetensors")
    args = ["lora", "bake", str(run / "run"), "--t", f"0.0:{EDGE}", "--out", str(out)]
    assert main([*args, "--format", layout]) == 0
    assert "relative error" in capsys.readouterr().out
    state, alphas, meta = Pipeline.lora_state_dict(out, return_lora_metadata=True)
    unet = lora_unet(run / "pipe")
    unet.load_lora_adapter(
        state, prefix="unet", network_alphas=alphas, metadata=meta, adapter_name="baked"
    )
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    # every module of the file became a LoRA layer, every factor loaded
    keys = read_weights(read_lora_path(out), None, "f", OSError)[1]
    stems = {k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in keys}
    assert len(stems) == len(layers) and len(state) == 2 * len(layers)
    peft_dw = {n: m.get_delta_weight("baked") for n, m in layers.items()}
    assert_close_deltas(peft_dw, delta_at(run / "run", EDGE / 2))


def read_lora_path(out):
    return out / "pytorch_lora_weights.safetensors" if out.is_dir() else out


def test_peft_folder_at_a_rank_and_its_error(run, tmp_path, capsys):
    out = tmp_path / "p"
    args = ["lora", "bake", str(run / "run"), "--t", "0.0:1.0", "--out", str(out)]
    assert main([*args, "--format", "peft", "--rank", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()[:-1]  # "module: rank R, relative error E"
    errors = {line.split(":")[0]: float(line.rsplit(" ", 1)[1]) for line in lines}
    model = peft.PeftModel.from_pretrained(lora_unet(run / "pipe"), out)
    layers = {
        n.removeprefix("base_model.model."): m
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }
    assert {m.r["default"] for m in layers.values()} == {1}
    # the mean of dW over the run's timesteps, by hand, and each module's printed error
    cfg, denoiser, _ = load_run(run / "run")
    w = basis_weights(denoiser, cfg, levels_in(denoiser.precond, 0, 1), None)
    for name, layer in lora_layers(denoiser.net.net).items():
        mean = torch.stack([layer.get_delta_weight(row) for row in w[name]]).mean(0).detach()
        got = layers[name.removeprefix("unet.")].get_delta_weight("default")
        u, s, vh = torch.linalg.svd(mean.double())
        best = (u[:, :1] * s[:1]) @ vh[:1]  # Eckart-Young: the best rank-1 approximation
        torch.testing.assert_close(got.double(), best, atol=1e-5, rtol=1e-4)
        assert errors[name.removeprefix("unet.")] == pytest.approx(
            float((mean - best).norm() / mean.norm()), rel=1e-3
        )


def test_segments_and_the_schedule_that_switches_between_them(run, tmp_path, capsys):
    out = tmp_path / "seg"
    args = ["lora", "bake", str(run / "run"), "--t", f"0.0:{2 * EDGE}", "--out", str(out)]
    assert main([*args, "--format", "kohya", "--segments", "2"]) == 0
    want = delta_at(run / "run", EDGE / 2)
    lora = read_lora(out / "segment-0.safetensors", base_modules=dict.fromkeys(want))
    assert_close_deltas(lora.deltas(), want)
    rows = list(csv.DictReader((out / "schedule.csv").open()))
    assert len(rows) == 3  # the run's sampler steps
    for row in rows:
        t = float(row["t"])
        want = [t <= EDGE, EDGE < t <= 2 * EDGE]
        assert [float(row["segment-0"]), float(row["segment-1"])] == [float(x) for x in want]
    assert {p.name for p in out.iterdir()} == {
        "segment-0.safetensors",
        "segment-1.safetensors",
        "schedule.csv",
        "keyframes.json",
        "diffusers_callback.py",
    }


def test_noise_levels_invert_the_objectives_time(run):
    cfg, denoiser, _ = load_run(run / "run")
    t = levels_in(denoiser.precond, 0.1, 0.3)
    assert (t * 999).round().tolist() == list(range(100, 300))  # timesteps k/999 in [0.1, 0.3]
    back = denoiser.precond.time_of_label(label_of_time(denoiser.precond, t))
    torch.testing.assert_close(back, t)


def test_mistakes_are_one_line_and_write_nothing(run, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    bake = ["lora", "bake", str(run / "run"), "--out", str(out), "--format", "kohya"]
    for extra, message in [
        (["--t", "0.5:0.2"], "0 <= T0 <= T1 <= 1"),
        (["--t", "a:b"], "two numbers"),
        (["--t", "0:1", "--label", "3"], "unconditional"),
        (["--t", "0:1", "--rank", "0"], "--rank must be >= 1"),
        (["--t", "0:1", "--segments", "0"], "--segments must be >= 1"),
    ]:
        assert main([*bake, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    nothing = ["lora", "bake", str(tmp_path), "--t", "0:1", "--out", str(out)]
    assert main([*nothing, "--format", "kohya"]) == 2
    assert "condlora: error:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_uc_lora_weights_are_those_of_a_full_forward_pass_per_class(tmp_path):
    """On the digits net (EDM, class-conditional UC-LoRA): the basis weights read for baking
    are what each layer uses in a whole denoiser call at that noise level and class."""
    from condlora.image.bake import bake, mean_weights
    from condlora.image.config import load_config

    from .conftest import CONFIGS, TINY

    extra = ["train.max_steps=2", "lora.mlp_widths=[16, 8]", "lora.mlp_groups=4"]
    cfg = load_config(CONFIGS / "digits-uclora.yaml", [*TINY, *extra])
    train(cfg, tmp_path / "run", progress=False)
    cfg, denoiser, _ = load_run(tmp_path / "run")
    layers = lora_layers(denoiser.net.net)
    t, y = torch.tensor([0.1, 0.7, 0.7]), torch.tensor([3, 3, 5])
    used = {}
    for name, layer in layers.items():

        def record(module, args, name=name):
            used.setdefault(name, module.state.lora_weights(module.index)[1])

        layer.register_forward_pre_hook(record)
    sigma = torch.exp(torch.log(torch.tensor(0.002)) + t * torch.log(torch.tensor(80 / 0.002)))
    with torch.no_grad():
        denoiser(torch.randn(3, 1, 16, 16), sigma, class_labels=y)
    got = basis_weights(denoiser, cfg, t, y)
    for name in layers:
        torch.testing.assert_close(got[name], used[name], atol=1e-5, rtol=1e-4)
    # no --label: the mean over every class (here at one noise level)
    each = [mean_weights(denoiser, cfg, 0.5, 0.5, label=k) for k in range(10)]
    every = mean_weights(denoiser, cfg, 0.5, 0.5)
    for name in layers:
        torch.testing.assert_close(every[name], torch.stack([w[name] for w in each]).mean(0))
    baked = bake(denoiser, cfg, 0.5, 0.5)
    assert baked.biases  # digits-uclora trains a per-basis bias: reported as left out


def test_schedule_writes_each_bases_strength_per_step(run, tmp_path, capsys):
    import json

    from condlora.image.strength import sampler_times

    out = tmp_path / "sched"
    assert main(["lora", "schedule", str(run / "run"), "--out", str(out)]) == 0
    cfg, denoiser, _ = load_run(run / "run")
    ts = sampler_times(denoiser, 3)
    w = basis_weights(denoiser, cfg, torch.tensor(ts), None)
    rows = list(csv.DictReader((out / "strengths.csv").open()))
    assert len(rows) == 3 and len(rows[0]) == 2 + 3 * len(w)  # step, t, m bases per module
    for k, row in enumerate(rows):
        for name, values in w.items():
            for i in range(3):
                got = float(row[f"{name.removeprefix('unet.')}:{i}"])
                assert got == pytest.approx(float(values[k, i]), abs=1e-5)
    frames = json.loads((out / "keyframes.json").read_text())["keyframes"]
    assert len(frames) == 3 * len(w) and all(len(f) == 3 for f in frames.values())
    blocks = ["lora", "schedule", str(run / "run"), "--out", str(tmp_path / "b"), "--blocks"]
    assert main(blocks) == 0
    header = (tmp_path / "b" / "strengths.csv").read_text().splitlines()[0].split(",")
    parts = ("down_blocks.1", "mid_block", "up_blocks.0")
    assert sorted(header[2:]) == [f"{b}:{i}" for b in parts for i in range(3)]
    assert main(["lora", "schedule", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


def test_the_diffusers_callback_runs_the_runs_lora_at_each_step(run, tmp_path):
    from condlora.lora.diffusers_callback import ConditionalLoRA

    out = tmp_path / "sched"
    assert main(["lora", "schedule", str(run / "run"), "--out", str(out)]) == 0
    pipe = diffusers.DDPMPipeline(
        unet=diffusers.UNet2DModel.from_pretrained(run / "pipe" / "unet"),
        scheduler=diffusers.DDPMScheduler.from_pretrained(run / "pipe" / "scheduler"),
    )
    lora = ConditionalLoRA(pipe.unet, out / "condlora_lora.safetensors")
    _, denoiser, _ = load_run(run / "run")
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    lora.start(pipe, num_inference_steps=4)
    with torch.no_grad():  # a pipeline's loop, as diffusers writes it
        for step, t in enumerate(pipe.scheduler.timesteps):
            eps = pipe.unet(x, t).sample
            want = denoiser.net(x, t.float().expand(2))  # the run's own net at this step
            torch.testing.assert_close(eps, want, atol=1e-5, rtol=1e-4)
            x = pipe.scheduler.step(eps, t, x).prev_sample
            lora.callback_on_step_end(pipe, step, t, {})
    # a pipeline without callbacks: the condition follows the timestep of every call
    seen = []
    lora.follow_timesteps()
    layer = next(m for m in pipe.unet.modules() if hasattr(m, "state"))
    layer.register_forward_pre_hook(lambda m, a: seen.append(float(m.state.t[0])))
    pipe(batch_size=1, num_inference_steps=3, output_type="np")
    assert seen == pytest.approx([t / 999 for t in pipe.scheduler.timesteps.tolist()])
