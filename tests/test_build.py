"""Composition: config -> backbone + LoRA + objective, and the condition each layer sees."""

import pytest
import torch

from condlora.core.errors import ConfigError
from condlora.diffusion import EDMPrecond, EpsPrecond
from condlora.image.build import build_denoiser, build_net
from condlora.image.config import load_config
from condlora.lora import CondLoRALayer, lora_layers

from .conftest import CONFIGS


def cfg_of(name, *overrides):
    return load_config(CONFIGS / f"{name}.yaml", list(overrides))


def test_objective_settings_reach_the_preconditioner():
    d = build_denoiser(cfg_of("digits-baseline", "diffusion.p_mean=-0.4", "diffusion.p_std=1.0"))
    assert isinstance(d.precond, EDMPrecond)
    assert (d.precond.P_mean, d.precond.P_std, d.precond.sigma_data) == (-0.4, 1.0, 0.5)
    d = build_denoiser(cfg_of("digits-timelora", "diffusion.objective=ddpm"))
    assert isinstance(d.precond, EpsPrecond)
    # TimeLoRA gets one table row per discrete timestep of the schedule
    for layer in lora_layers(d).values():
        assert layer.composer.omega.shape == (1000, 11)


@pytest.mark.parametrize(
    "name, bases",
    [
        ("digits-uclora", 8),
        ("digits-timelora", 11),
        ("digits-classlora", 21),
        ("digits-onlylora", 8),
    ],
)
def test_every_attention_projection_is_wrapped(name, bases):
    d = build_denoiser(cfg_of(name))
    layers = lora_layers(d)
    attn = [n for n, m in build_net(cfg_of(name)).named_modules() if n.endswith((".qkv", ".proj"))]
    assert len(layers) == len(attn) > 0
    assert all(layer.num_bases == bases for layer in layers.values())


def test_only_lora_has_no_scale_and_shift():
    names = [n for n, _ in build_denoiser(cfg_of("digits-onlylora")).named_modules()]
    assert not any(n.endswith("emb_proj") for n in names)
    names = [n for n, _ in build_denoiser(cfg_of("digits-uclora")).named_modules()]
    assert any(n.endswith("emb_proj") for n in names)


def test_lora_condition_follows_the_denoiser_call():
    """The same noisy input under two classes gives different outputs only through ClassLoRA."""
    torch.manual_seed(0)
    d = build_denoiser(cfg_of("digits-classlora", "net.cond_mode=lora_only"))
    with torch.no_grad():  # the U-Net zero-initialises its output layers, and LoRA B = 0
        for p in d.parameters():
            if not p.any():
                p.normal_(std=0.1)
    x = torch.randn(2, 1, 16, 16)
    a = d(x, 1.0, class_labels=torch.tensor([3, 3]))
    b = d(x, 1.0, class_labels=torch.tensor([3, 5]))
    assert torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_unknown_choices_are_config_errors():
    with pytest.raises(ConfigError, match="cond_mode"):
        build_denoiser(cfg_of("digits-baseline", "net.cond_mode=sideways"))
    with pytest.raises(ConfigError, match="lora.method"):
        build_denoiser(cfg_of("digits-baseline", "net.cond_mode=both"))
    with pytest.raises(ConfigError, match="objective"):
        build_denoiser(cfg_of("digits-baseline", "diffusion.objective=flow"))


@pytest.mark.parametrize(
    "name", ["digits-timelora.yaml", "digits-classlora.yaml", "digits-uclora.yaml"]
)
def test_sampling_fast_path_merges_in_the_layers(name, tiny_overrides, monkeypatch):
    """No gradients and one condition for the batch: every LoRA layer applies W + dW."""
    denoiser = build_denoiser(load_config(CONFIGS / name, tiny_overrides)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in denoiser.named_parameters():
            if "lora_" in n or "omega" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    weights = {n: p.clone() for n, p in denoiser.state_dict().items()}
    x = torch.randn(4, 1, 16, 16, generator=g)
    same, mixed = torch.full((4,), 3), torch.tensor([0, 3, 3, 7])
    merges = []
    fast_path = CondLoRALayer._forward_merged

    def counting(layer, *args):
        merges.append(layer)
        return fast_path(layer, *args)

    monkeypatch.setattr(CondLoRALayer, "_forward_merged", counting)
    layers = len(lora_layers(denoiser))
    with torch.no_grad():
        fast = denoiser(x, 0.8, class_labels=same)
        assert len(merges) == layers  # one shared condition: every layer merged
        denoiser(x, 0.8, class_labels=mixed)
        reads_class = name != "digits-timelora.yaml"  # TimeLoRA merges with mixed classes
        assert len(merges) == (layers if reads_class else 2 * layers)
    calls = len(merges)
    with torch.enable_grad():
        slow = denoiser(x, 0.8, class_labels=same)  # gradients on: never merged
    assert len(merges) == calls
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(p, weights[n]) for n, p in denoiser.state_dict().items())
