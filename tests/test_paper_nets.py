"""The paper's networks: exact Table 1 parameter counts, attention against plain references,
and freshly injected LoRA models that compute exactly the baseline."""

import copy
import math

import pytest
import torch

from condlora.cli import main
from condlora.image.build import build_denoiser, build_net, lora_config
from condlora.image.config import load_config
from condlora.lora import conditioning, inject
from condlora.nets import ADMUNet, DDPMppUNet
from condlora.nets.adm import AttentionBlock
from condlora.nets.ddpmpp import UNetBlock
from tests.conftest import CONFIGS, TINY_ADM, TINY_EDM, assert_same_function

TABLE_1 = {  # the paper's Table 1: baseline, only LoRA, with LoRA
    "iddpm-uncond": (52546438, 47591440, 54880528),
    "iddpm-cond": (52551558, 48513040, 55807248),
    "edm-uncond": (55733891, 53411675, 57745499),
    "edm-cond": (55735299, 53413083, 57746907),
}
CELLS = [
    (f"cifar10-{model}-{variant}.yaml", count)
    for model, counts in TABLE_1.items()
    for variant, count in zip(("baseline", "onlylora", "lora"), counts, strict=True)
]


@pytest.mark.parametrize("config, expected", CELLS)
def test_info_prints_table_1_counts(config, expected, capsys):
    assert main(["info", "--config", str(CONFIGS / config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"parameters: {expected}" in lines


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Small random values everywhere, so zero-initialised layers do not hide paths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def test_adm_attention_matches_plain_reference():
    block = randomize(AttentionBlock(32, num_heads=4))
    x = torch.randn(2, 32, 4, 4)
    flat = x.reshape(2, 32, 16)
    qkv = block.qkv(block.norm(flat))  # (B, 3C, L): per head h, rows [q_h; k_h; v_h]
    heads = []
    for h in range(4):
        chunk = qkv[:, h * 24 : (h + 1) * 24]
        q, k, v = chunk[:, :8], chunk[:, 8:16], chunk[:, 16:]
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(8), dim=-1)  # (B, Lq, Lk)
        heads.append((weights @ v.transpose(1, 2)).transpose(1, 2))
    expected = flat + block.proj_out(torch.cat(heads, dim=1))
    torch.testing.assert_close(block(x), expected.reshape(x.shape), atol=1e-5, rtol=1e-5)


def test_ddpmpp_block_matches_plain_reference():
    block = randomize(UNetBlock(8, 16, emb_channels=12, down=True, attention=True)).eval()
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, 12)
    h = block.conv0(torch.nn.functional.avg_pool2d(torch.nn.functional.silu(block.norm0(x)), 2))
    h = h + block.affine(emb)[:, :, None, None]
    h = block.conv1(torch.nn.functional.silu(block.norm1(h)))
    h = (h + block.skip(torch.nn.functional.avg_pool2d(x, 2))) / math.sqrt(2)
    q, k, v = block.qkv(block.norm2(h)).reshape(2, 16, 3, 16).unbind(2)  # (B, C, L) each
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(16), dim=-1)
    attn = (weights @ v.transpose(1, 2)).transpose(1, 2).reshape(2, 16, 4, 4)
    expected = (block.proj(attn) + h) / math.sqrt(2)
    torch.testing.assert_close(block(x, emb), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config, tiny",
    [
        ("cifar10-iddpm-uncond-lora.yaml", TINY_ADM),
        ("cifar10-iddpm-cond-lora.yaml", TINY_ADM),
        ("cifar10-edm-uncond-lora.yaml", TINY_EDM),
        ("cifar10-edm-cond-lora.yaml", TINY_EDM),
    ],
)
def test_fresh_lora_model_computes_the_baseline(config, tiny):
    cfg = load_config(CONFIGS / config, tiny)
    base = randomize(build_net(cfg)).eval()
    lora = copy.deepcopy(base)
    inject(lora, lora_config(cfg))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=g)
    noise = torch.tensor([5.0, 1000.0, 3999.0]) if "iddpm" in config else torch.randn(3)
    labels = torch.tensor([0, 4, 9]) if "-cond-" in config else None
    extra = {"augment_labels": torch.randn(3, 9, generator=g)} if "edm" in config else {}
    with torch.no_grad(), conditioning(lora, t=torch.rand(3, generator=g), y=labels):
        assert_same_function(lora(x, noise, labels, **extra), base(x, noise, labels, **extra))


def test_only_lora_models_train_their_lora_path():
    cfg = load_config(CONFIGS / "cifar10-edm-cond-onlylora.yaml", TINY_EDM)
    denoiser = build_denoiser(cfg)
    with torch.no_grad():  # B = 0 at injection blocks every gradient behind it: open the path
        for name, p in denoiser.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    names = [n for n, _ in denoiser.named_parameters()]
    assert not any(".affine." in n for n in names)  # no residual-block conditioning
    loss = denoiser.loss(torch.randn(2, 3, 32, 32), class_labels=torch.tensor([1, 2]))
    loss.backward()
    grads = {n: p.grad for n, p in denoiser.named_parameters()}
    mlp = [g for n, g in grads.items() if ".composer." in n]
    assert mlp and all(g is not None for g in mlp)  # UC-LoRA's MLP sees the embedding
    assert grads["net.net.map_label.weight"].abs().sum() > 0  # class reaches LoRA via the MLP


@pytest.mark.parametrize("net_cls", [ADMUNet, DDPMppUNet])
def test_float_class_weights_equal_integer_labels(net_cls):
    net = randomize(net_cls(model_channels=32, channel_mult=(1, 2), num_blocks=1, num_classes=5))
    net.eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.tensor([3.0, 40.0])
    y = torch.tensor([1, 4])
    one_hot = torch.nn.functional.one_hot(y, 5).float()
    with torch.no_grad():
        torch.testing.assert_close(net(x, noise, one_hot), net(x, noise, y))


def test_adm_embeds_rescaled_timesteps():
    net = randomize(ADMUNet(model_channels=32, channel_mult=(1, 2), num_blocks=1)).eval()
    scaled = copy.deepcopy(net)
    scaled.timestep_scale = 0.25  # IDDPM feeds t * 1000 / T: T = 4000
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([100.0, 3999.0])
    with torch.no_grad():
        torch.testing.assert_close(scaled(x, t), net(x, t * 0.25))
        assert not torch.allclose(scaled(x, t), net(x, t))


def test_adm_config_rescales_timesteps_like_iddpm():
    cfg = load_config(CONFIGS / "cifar10-iddpm-uncond-baseline.yaml", TINY_ADM)
    assert build_net(cfg).timestep_scale == 1000 / 4000
