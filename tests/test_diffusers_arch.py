"""net.arch diffusers: conditional LoRA trained on a local diffusers UNet2DModel (frozen),
sampled like any run; the pipeline's scheduler decides the objective."""

import pytest
import torch
from safetensors.torch import load_file

from condlora.core.errors import ConfigError
from condlora.image.config import load_config
from condlora.image.generate import generate
from condlora.image.task import load_run, train

from .conftest import CONFIGS, TINY

diffusers = pytest.importorskip("diffusers")


def tiny_pipeline(root, prediction="epsilon", classes=None):
    """A pipeline folder made by diffusers itself: unet/ (a small UNet2DModel) and scheduler/."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
        num_class_embeds=classes,
    )
    with torch.no_grad():  # diffusers zero-initialises nothing we rely on; keep it seeded
        unet.save_pretrained(root / "unet")
    diffusers.DDPMScheduler(prediction_type=prediction).save_pretrained(root / "scheduler")
    return root


def config(root, *extra):
    overrides = [*TINY, "net.arch=diffusers", f"net.pretrained={root}"]
    overrides += ["net.class_conditional=false", "diffusion.objective=ddpm"]
    overrides += ["diffusion.sample_steps=3", "train.max_steps=2", "lora.method=time"]
    overrides += ["lora.targets=[to_q, to_v]", "net.cond_mode=scale_shift"]
    return load_config(CONFIGS / "digits-baseline.yaml", [*overrides, *extra])


@pytest.mark.parametrize("method", ["time", "uc"])
def test_lora_trains_on_a_frozen_diffusers_unet_and_samples(tmp_path, method):
    root = tiny_pipeline(tmp_path / "pipe")
    base = diffusers.UNet2DModel.from_pretrained(root / "unet").state_dict()
    cfg = config(root, f"lora.method={method}", "lora.mlp_widths=[16, 8]", "lora.mlp_groups=4")
    train(cfg, tmp_path / "run", progress=False)
    _, denoiser, step = load_run(tmp_path / "run")
    assert step == 2
    state = {k.replace(".base_layer", ""): v for k, v in denoiser.net.net.unet.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in base.items())  # the base stayed frozen
    lora = {k: v for k, v in denoiser.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())  # the LoRA trained
    images = generate(denoiser, cfg, 4, steps=3, seed=0)
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all()
    # the run's files hold what it trained, not the frozen base (read from its folder)
    for name, part in (("ema.safetensors", ""), ("checkpoint.safetensors", "model.")):
        keys = list(load_file(tmp_path / "run" / name))
        weights = [k.removeprefix(part) for k in keys if k.startswith(part)]
        assert weights and not any(".base_layer." in k or "conv_in" in k for k in weights)
        assert {k for k in weights if "lora_" in k} == {
            k for k in denoiser.state_dict() if "lora_" in k
        }


def test_a_frozen_base_run_resumes_from_its_small_checkpoint(tmp_path):
    root = tiny_pipeline(tmp_path / "pipe")
    base = diffusers.UNet2DModel.from_pretrained(root / "unet").state_dict()
    cfg = config(root, "lora.method=uc", "lora.mlp_widths=[16, 8]", "lora.mlp_groups=4")
    train(cfg, tmp_path / "run", progress=False)
    before = load_file(tmp_path / "run" / "checkpoint.safetensors")
    train(cfg, tmp_path / "run", resume=True, max_steps=3, progress=False)
    _, denoiser, step = load_run(tmp_path / "run")
    assert step == 3
    state = {k.replace(".base_layer", ""): v for k, v in denoiser.net.net.unet.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in base.items())  # the base read from its folder
    after = load_file(tmp_path / "run" / "checkpoint.safetensors")
    assert sorted(after) == sorted(before)  # the same small set of tensors
    assert any(not torch.equal(after[k], before[k]) for k in after if "lora_B" in k)


def test_a_config_that_does_not_fit_the_model_is_one_line(tmp_path):
    root = tiny_pipeline(tmp_path / "pipe", prediction="v_prediction")
    from condlora.image.build import build_denoiser

    with pytest.raises(ConfigError, match="scheduler trained objective v"):
        build_denoiser(config(root))
    with pytest.raises(ConfigError, match="set data.resolution 16"):
        build_denoiser(config(root, "diffusion.objective=v", "data.resolution=8"))
    with pytest.raises(ConfigError, match="goes with net.arch diffusers"):
        config(root, "net.pretrained=null")
    with pytest.raises(ConfigError, match="no diffusers config.json"):
        build_denoiser(config(tmp_path))


def test_a_class_conditional_unet_samples_the_label_asked_for(tmp_path, capsys):
    from condlora.cli import main

    root = tiny_pipeline(tmp_path / "pipe", classes=10)
    cfg = config(root, "net.class_conditional=true", "lora.method=uc", "lora.mlp_widths=[8]")
    train(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "three.png"
    args = ["sample", "--run", str(tmp_path / "run"), "--num", "4", "--out", str(out)]
    assert main([*args, "--label", "3"]) == 0
    assert out.is_file() and "wrote 4 samples" in capsys.readouterr().out
    _, denoiser, _ = load_run(tmp_path / "run")
    three, five = (generate(denoiser, cfg, 2, torch.full((2,), k), seed=0) for k in (3, 5))
    assert (three - five).abs().max() > 1e-3  # the class reaches the U-Net's embedding
    with pytest.raises(ConfigError, match="no null class"):
        from condlora.image.build import build_denoiser

        build_denoiser(config(root, "net.class_conditional=true", "train.label_dropout=0.1"))


def test_train_base_trains_the_unets_own_weights(tmp_path):
    root = tiny_pipeline(tmp_path / "pipe")
    base = diffusers.UNet2DModel.from_pretrained(root / "unet").state_dict()
    train(config(root, "lora.method=none", "net.train_base=true"), tmp_path / "run", progress=False)
    _, denoiser, _ = load_run(tmp_path / "run")
    trained = denoiser.net.net.unet.state_dict()
    assert not all(torch.equal(trained[k], v) for k, v in base.items())
    with pytest.raises(ConfigError, match="train_base goes with net.arch diffusers"):
        load_config(CONFIGS / "digits-baseline.yaml", ["net.train_base=true"])


def test_the_digits_example_configs_build_on_its_unet(tmp_path):
    """configs/diffusers/*.yaml on the UNet2DModel that scripts/digits_diffusers.py makes:
    the baseline trains every U-Net weight, UC-LoRA only its LoRA."""
    import importlib.util

    from condlora.image.build import build_denoiser

    path = CONFIGS.parent / "scripts" / "digits_diffusers.py"
    spec = importlib.util.spec_from_file_location("digits_diffusers", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    unet = example.make_unet()
    assert 1_000_000 < sum(p.numel() for p in unet.parameters()) < 1_300_000  # quickstart's size
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "scheduler")
    trainable = {}
    for name in ("baseline", "uclora"):
        cfg = load_config(
            CONFIGS / "diffusers" / f"digits-{name}.yaml", [f"net.pretrained={tmp_path}"]
        )
        denoiser = build_denoiser(cfg)
        trainable[name] = {n for n, p in denoiser.named_parameters() if p.requires_grad}
    assert all("lora" not in n for n in trainable["baseline"])
    assert trainable["uclora"] and all("lora" in n or "composer" in n for n in trainable["uclora"])


def counted(module):
    """A list that grows by one at every call of the module's forward."""
    calls, forward = [], module.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = counting
    return calls


@pytest.mark.parametrize("method", ["time", "uc"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, method):
    from condlora.image.build import build_denoiser

    root = tiny_pipeline(tmp_path / "pipe")
    extra = [f"lora.method={method}", "lora.mlp_widths=[16, 8]", "lora.mlp_groups=4"]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = config(root, *extra, f"net.gradient_checkpointing={str(checkpointing).lower()}")
        denoiser = build_denoiser(cfg).train()
        assert denoiser.net.net.unet.is_gradient_checkpointing == checkpointing
        with torch.no_grad():  # a fresh LoRA's B = 0 would give A no gradient
            for name, p in denoiser.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        # a checkpointed block runs again in the backward pass (hooks do not see it)
        calls = counted(denoiser.net.net.unet.up_blocks[-1].resnets[0])  # after a LoRA
        g = torch.Generator().manual_seed(2)
        x0 = torch.randn(4, 1, 16, 16, generator=g)
        denoiser.loss(x0, generator=g).backward()
        assert len(calls) == (2 if checkpointing else 1)
        grads.append(
            {n: p.grad.clone() for n, p in denoiser.named_parameters() if p.grad is not None}
        )
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)


def tiny_dit_pipeline(root, learn_sigma=False):
    """A DiT pipeline folder made by diffusers itself: transformer/ (a class-conditional
    DiTTransformer2DModel on 1 x 16 x 16, 10 classes) and scheduler/."""
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=2 if learn_sigma else None,
        num_layers=2,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=1,
    )
    dit.save_pretrained(root / "transformer")
    diffusers.DDPMScheduler().save_pretrained(root / "scheduler")
    return root


@pytest.mark.parametrize("method", ["time", "uc"])
def test_lora_trains_on_a_frozen_dit_and_samples_by_class(tmp_path, method):
    from condlora.image.build import build_denoiser
    from condlora.image.generate import labels_for

    root = tiny_dit_pipeline(tmp_path / "pipe", learn_sigma=True)
    dit = diffusers.DiTTransformer2DModel.from_pretrained(root / "transformer").eval()
    extra = [f"lora.method={method}", "lora.mlp_widths=[16, 8]", "lora.mlp_groups=4"]
    cfg = config(root, *extra, "net.class_conditional=true", "lora.targets=[to_q, to_v]")
    # a fresh LoRA computes what the DiT computes (its epsilon half)
    fresh = build_denoiser(cfg).eval()
    g = torch.Generator().manual_seed(3)
    x, t, y = (
        torch.randn(3, 1, 16, 16, generator=g),
        torch.tensor([5.0, 300.0, 900.0]),
        torch.tensor([0, 4, 9]),
    )
    with torch.no_grad():
        want = dit(x, timestep=t, class_labels=y).sample[:, :1]
        torch.testing.assert_close(fresh.net(x, t, y), want, rtol=1e-5, atol=1e-5)

    train(cfg, tmp_path / "run", progress=False)
    _, denoiser, step = load_run(tmp_path / "run")
    assert step == 2
    state = {k.replace(".base_layer", ""): v for k, v in denoiser.net.net.unet.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in dit.state_dict().items())  # frozen
    lora = {k: v for k, v in denoiser.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())
    images = generate(denoiser, cfg, 4, labels_for(cfg, 4, 3), steps=3, seed=0)
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all()
    # the run's LoRA inside the DiT itself (as in a DiT pipeline's transformer): its output
    from condlora.cli import main
    from condlora.lora.diffusers_callback import ConditionalLoRA

    assert main(["lora", "schedule", str(tmp_path / "run"), "--out", str(tmp_path / "s")]) == 0
    x, y, t = x[:2], torch.tensor([4, 4]), torch.tensor([300.0, 300.0])
    with torch.no_grad():
        plain, want = dit(x, timestep=t, class_labels=y).sample[:, :1], denoiser.net(x, t, y)
        lora = ConditionalLoRA(dit, tmp_path / "s" / "condlora_lora.safetensors", 4, 1000)
        lora.set_timestep(300)
        got = dit(x, timestep=t, class_labels=y).sample[:, :1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (want - plain).abs().max() > 1e-4  # the LoRA changes the DiT's output
    # and the commands on the run: a baked file named as the DiT's modules, a class grid
    bake = ["lora", "bake", str(tmp_path / "run"), "--t", "0.0:0.4", "--format", "diffusers"]
    assert main([*bake, "--out", str(tmp_path / "b.safetensors")]) == 0
    baked = load_file(tmp_path / "b.safetensors")
    assert baked and all(k.startswith("unet.transformer_blocks.") for k in baked)  # the layout
    sample = ["sample", "--run", str(tmp_path / "run"), "--label", "3", "--num", "4"]
    assert main([*sample, "--steps", "3", "--out", str(tmp_path / "s.png")]) == 0


def test_a_dit_saved_as_transformer2dmodel_reads_as_a_dit(tmp_path):
    """The DiT checkpoints name their class Transformer2DModel (ada_norm_zero): read as the
    DiT it is, computing what the DiT computes."""
    import json

    from condlora.image.build import build_denoiser

    root = tiny_dit_pipeline(tmp_path / "pipe")
    dit = diffusers.DiTTransformer2DModel.from_pretrained(root / "transformer").eval()
    path = root / "transformer" / "config.json"
    path.write_text(
        json.dumps(json.loads(path.read_text()) | {"_class_name": "Transformer2DModel"})
    )
    cfg = config(root, "net.class_conditional=true")
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 700.0]), torch.tensor([1, 8])
    with torch.no_grad():
        want = dit(x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(build_denoiser(cfg).eval().net(x, t, y), want)


def test_an_unconditional_dit_config_is_one_line(tmp_path):
    from condlora.image.build import build_denoiser

    root = tiny_dit_pipeline(tmp_path / "pipe")
    with pytest.raises(ConfigError, match="a DiT is class-conditional"):
        build_denoiser(config(root))


@pytest.mark.parametrize("method", ["time", "uc"])
def test_gradient_checkpointing_of_a_dits_blocks_with_lora_inside(tmp_path, method):
    """A DiT checkpoints its transformer blocks, which hold the LoRA layers: the recomputed
    blocks see the pass's condition again (runtime.checkpointed), the same gradients."""
    from condlora.image.build import build_denoiser

    root = tiny_dit_pipeline(tmp_path / "pipe")
    extra = [f"lora.method={method}", "lora.mlp_widths=[16, 8]", "lora.mlp_groups=4"]
    extra += ["net.class_conditional=true", "lora.targets=[to_q, to_v]"]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = config(root, *extra, f"net.gradient_checkpointing={str(checkpointing).lower()}")
        denoiser = build_denoiser(cfg).train()
        with torch.no_grad():  # a fresh LoRA's B = 0 would give A no gradient
            for name, p in denoiser.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        calls = counted(denoiser.net.net.unet.transformer_blocks[1])
        g = torch.Generator().manual_seed(2)
        x0, y = torch.randn(4, 1, 16, 16, generator=g), torch.tensor([0, 3, 3, 9])
        denoiser.loss(x0, class_labels=y, generator=g).backward()
        assert len(calls) == (2 if checkpointing else 1)
        grads.append({n: p.grad for n, p in denoiser.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)
