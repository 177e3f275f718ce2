"""Fidelity to the original code: UC-LoRA's MLP as the paper's code builds it, DDPM++ without
labels as EDM, and EDM's loss reduction. (Augment labels: test_augment; IDDPM's decoder NLL:
test_iddpm.)"""

import dataclasses
import math

import pytest
import torch
from torch import nn

from condlora.core.config import from_dict
from condlora.core.errors import ConfigError, LoRAError
from condlora.diffusion import Denoiser, make_precond
from condlora.image.build import build_denoiser, lora_config
from condlora.image.config import Config, load_config
from condlora.lora import LoRAConfig
from condlora.lora.composers import UCComposer, build_composer
from condlora.nets import DDPMppUNet
from condlora.nets.ddpmpp import positional_embedding
from tests.conftest import CONFIGS, TINY_EDM, FixedOutput

pytestmark = pytest.mark.usefixtures("one_thread")

EDM_CONFIGS = [
    f"cifar10-edm-{c}-{v}.yaml"
    for c in ("uncond", "cond")
    for v in ("baseline", "onlylora", "lora")
]
EDM_LORA_CONFIGS = [name for name in EDM_CONFIGS if not name.endswith("baseline.yaml")]


# --- config values of a union type (int | str) ------------------------------------------------


@dataclasses.dataclass
class Union:
    value: int | str = 1
    maybe: int | str | None = None


def test_union_values_take_the_first_type_that_fits():
    assert from_dict(Union, {"value": 16}).value == 16
    assert from_dict(Union, {"value": "auto"}).value == "auto"
    assert from_dict(Union, {"maybe": None}).maybe is None
    assert from_dict(Union, {"maybe": 3}).maybe == 3
    for bad in (3.5, True, [1]):
        with pytest.raises(ConfigError, match=r"^value must be an integer or a string, got"):
            from_dict(Union, {"value": bad})


def test_mlp_groups_accepts_auto_and_integers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  method: uc\n  mlp_groups: auto\n")
    assert load_config(path).lora.mlp_groups == "auto"
    assert load_config(path, ["lora.mlp_groups=4"]).lora.mlp_groups == 4
    for bad, match in [(0, "must be >= 1"), ("half", "must be >= 1"), (5, "not positive mult")]:
        with pytest.raises(LoRAError, match=match):
            LoRAConfig(method="uc", mlp_widths=[128, 64], mlp_groups=bad)
    assert LoRAConfig(method="uc", mlp_widths=[128, 64], mlp_groups="auto").mlp_groups == "auto"


# --- 1. UC-LoRA MLP GroupNorm groups: min(32, w // 4) ------------------------------------------


def norms(composer: nn.Module) -> list[tuple[int, int]]:
    return [
        (m.num_groups, m.num_channels) for m in composer.modules() if isinstance(m, nn.GroupNorm)
    ]


@pytest.mark.parametrize("name", EDM_LORA_CONFIGS)
def test_edm_uclora_mlps_use_the_papers_groups(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.lora.mlp_groups == "auto" and cfg.lora.mlp_widths == [128, 64]
    composer = build_composer(lora_config(cfg), emb_dim=512)
    assert norms(composer) == [(32, 128), (16, 64)]


def test_auto_groups_rule_at_every_width():
    widths = [4, 8, 12, 64, 124, 128, 256]
    composer = UCComposer(emb_dim=6, widths=widths, groups="auto", num_bases=3)
    assert norms(composer) == [(min(32, w // 4), w) for w in widths]
    assert norms(UCComposer(6, [16, 8], 4, 3)) == [(4, 16), (4, 8)]  # an int: every layer


def test_tiny_edm_lora_model_builds_with_auto_groups():
    cfg = load_config(CONFIGS / "cifar10-edm-cond-lora.yaml", TINY_EDM + ["lora.mlp_groups=auto"])
    composers = [m for m in build_denoiser(cfg).modules() if isinstance(m, UCComposer)]
    assert composers and all(norms(c) == [(4, 16), (2, 8)] for c in composers)


# --- 2. UC-LoRA MLP initialisation: the paper's code's Kaiming-normal, zero bias --------------


def test_uclora_mlp_linears_start_kaiming_normal_with_zero_bias():
    torch.manual_seed(0)
    composer = UCComposer(emb_dim=512, widths=[256, 128], groups="auto", num_bases=64)
    linears = [m for m in composer.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 256), (256, 128), (128, 64)]
    for layer in linears:  # the last one, to the m bases, too
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        w = layer.weight.detach().double().flatten()
        # EDM's weight_init("kaiming_normal"): sqrt(1 / fan_in) * randn. PyTorch's default
        # (kaiming_uniform, a = sqrt(5)) has std 1 / sqrt(3 fan_in) and a uniform shape;
        # Kaiming with ReLU gain has sqrt(2 / fan_in): both far outside these bounds.
        std = 1 / math.sqrt(layer.in_features)
        assert abs(w.mean().item()) < 0.03 * std
        assert w.std().item() == pytest.approx(std, rel=0.03)
        kurtosis = ((w - w.mean()) ** 4).mean() / w.var() ** 2
        assert kurtosis.item() == pytest.approx(3.0, abs=0.15)  # normal: 3; uniform: 1.8


# --- 3. class-conditional DDPM++ without labels: EDM's zero row -------------------------------


def test_ddpmpp_without_labels_adds_the_label_mappings_bias():
    torch.manual_seed(1)
    net = DDPMppUNet(16, 3, 3, 8, (1, 2), 1, (8,), num_classes=4, augment_dim=0, dropout=0.0)
    with torch.no_grad():
        net.map_label.bias.normal_()
    noise = torch.tensor([0.3, -1.2])
    emb = net.embedding(noise, None)
    # EDM's EDMPrecond: class_labels None -> torch.zeros([1, label_dim]); map_label(0) = bias
    torch.testing.assert_close(emb, net.embedding(noise, torch.zeros(2, 4)))
    h = positional_embedding(noise, net.noise_channels) + net.map_label.bias
    ref = torch.nn.functional.silu(net.map_layer1(torch.nn.functional.silu(net.map_layer0(h))))
    torch.testing.assert_close(emb, ref)
    skipped = positional_embedding(noise, net.noise_channels)  # the mapping left out
    ref_skipped = net.map_layer1(torch.nn.functional.silu(net.map_layer0(skipped)))
    assert not torch.allclose(emb, torch.nn.functional.silu(ref_skipped))


# --- 6. EDM's loss reduction: sum over pixels, mean over the batch ---------------------------


def test_loss_reduction_sum_is_edms_per_image_sum():
    g = torch.Generator().manual_seed(2)
    x0, out = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    noise, sigma = torch.randn(3, 2, 4, 4, generator=g), torch.tensor([0.1, 1.0, 10.0])
    precond = make_precond("edm")
    losses = {
        r: Denoiser(FixedOutput(out), precond, r).loss(x0, sigma=sigma, noise=noise)
        for r in ("mean", "sum")
    }
    # EDM: loss = lambda(sigma) * (D - x0)^2 per element; its loop takes loss.sum() / batch
    c_skip, c_out, _ = (c.reshape(-1, 1, 1, 1) for c in precond.scalings(sigma))
    x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    D = c_skip * x + c_out * out
    edm = (1 / c_out**2 * (D - x0) ** 2).sum() / 3
    torch.testing.assert_close(losses["sum"], edm)
    torch.testing.assert_close(losses["mean"], edm / (2 * 4 * 4))
    with pytest.raises(ConfigError, match="unknown loss reduction 'total'"):
        Denoiser(FixedOutput(out), precond, "total")


def test_edm_configs_sum_and_digits_configs_mean():
    for name in EDM_CONFIGS:
        assert load_config(CONFIGS / name).diffusion.loss_reduction == "sum", name
    for path in CONFIGS.glob("digits-*.yaml"):
        assert load_config(path).diffusion.loss_reduction == "mean", path.name
    assert Config().diffusion.loss_reduction == "mean"
    assert Config().diffusion.decoder_nll == "tanh"


def test_build_denoiser_passes_the_reduction_and_the_decoder_nll():
    edm = load_config(CONFIGS / "cifar10-edm-uncond-baseline.yaml", TINY_EDM)
    assert build_denoiser(edm).loss_reduction == "sum"
    iddpm = ["net.model_channels=32", "net.num_blocks=1", "net.channel_mult=[1, 2]"]
    iddpm = load_config(CONFIGS / "cifar10-iddpm-uncond-baseline.yaml", iddpm)
    assert build_denoiser(iddpm).exact_decoder_nll is False
    exact = dataclasses.replace(iddpm.diffusion, decoder_nll="exact")
    assert build_denoiser(dataclasses.replace(iddpm, diffusion=exact)).exact_decoder_nll is True
    # the config refuses both when it is built, before any net exists
    for field, value, match in [
        ("decoder_nll", "erf", "unknown diffusion.decoder_nll 'erf'"),
        ("loss_reduction", "sum", "iddpm objective takes improved-diffusion's mean"),
    ]:
        with pytest.raises(ConfigError, match=match):
            from_dict(Config, {"diffusion": {"objective": "iddpm", field: value}})
