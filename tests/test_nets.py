"""SmallUNet: shapes, conditioning modes, no unused parameters, LoRA target names."""

import pytest
import torch
from torch import nn

from condlora.nets import SmallUNet

MODES = ["scale_shift", "lora_only", "both"]


def randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give zero-initialised weights (proj, conv2, conv_out) small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def inputs(batch=3, res=16, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, res, res, generator=g)
    sigma = torch.rand(batch, generator=g) * 10 + 0.01
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    return x, sigma.log() / 4, labels


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("res, attn", [(16, (8,)), (32, (16, 8))])
def test_output_shape(mode, res, attn):
    net = SmallUNet(img_resolution=res, attn_resolutions=attn, num_classes=10, cond_mode=mode)
    x, noise, labels = inputs(res=res)
    assert net(x, noise, labels).shape == x.shape
    assert net(x, noise).shape == x.shape  # class_labels None: the null class


def test_fully_convolutional_and_rejects_odd_sizes():
    net = SmallUNet()
    x, noise, _ = inputs(res=32)
    assert net(x, noise).shape == x.shape
    with pytest.raises(ValueError):
        net(torch.randn(1, 1, 18, 18), noise[:1])
    with pytest.raises(ValueError):
        SmallUNet(cond_mode="adanorm")


def test_default_parameter_count():
    n = sum(p.numel() for p in SmallUNet().parameters())
    assert n == 441_873  # pinned: a change to the default net must change this knowingly


def test_timestep_scale_labels():
    net = randomize(SmallUNet())
    x, _, _ = inputs()
    t = torch.tensor([0.0, 500.0, 999.0])
    out = net(x, t)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], net(x, torch.tensor([1.0, 500.0, 999.0]))[0])


@pytest.mark.parametrize("mode", ["scale_shift", "both"])
def test_long_labels_equal_one_hot(mode):
    net = randomize(SmallUNet(num_classes=10, cond_mode=mode))
    x, noise, labels = inputs()
    one_hot = nn.functional.one_hot(labels, 10).float()
    assert torch.equal(net(x, noise, labels), net(x, noise, one_hot))
    assert torch.equal(net(x, noise), net(x, noise, torch.zeros(3, 10)))
    assert not torch.allclose(net(x, noise, labels), net(x, noise, (labels + 1) % 10))


def test_target_module_names():
    net = SmallUNet(num_classes=10)
    names = dict(net.named_modules())
    assert isinstance(net.embed, nn.Module) and "embed" in names
    assert [n for n in names if n.endswith(".qkv")] and [n for n in names if n.endswith(".proj")]
    for name, module in names.items():
        if name.endswith(".qkv") or name.endswith(".proj"):
            assert isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
            c = module.in_channels
            assert module.out_channels == (3 * c if name.endswith(".qkv") else c)
    last = list(net.embed.modules())[-1]
    assert isinstance(last, nn.Linear) and last.out_features == net.emb_dim


@pytest.mark.parametrize("mode, keep", [("scale_shift", True), ("lora_only", True)])
def test_embed_hook_sees_embedding(mode, keep):
    net = SmallUNet(num_classes=10, cond_mode=mode, keep_embedding=keep)
    seen = []
    net.embed.register_forward_hook(lambda m, args, out: seen.append(out))
    x, noise, labels = inputs()
    net(x, noise, labels)
    assert len(seen) == 1 and seen[0].shape == (3, net.emb_dim)


@pytest.mark.parametrize("keep", [True, False])
def test_lora_only_has_no_embedding_path(keep):
    net = randomize(SmallUNet(num_classes=10, cond_mode="lora_only", keep_embedding=keep))
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            assert name.startswith("embed."), name
    assert not any("emb_proj" in n for n, _ in net.named_parameters())
    assert (net.embed is not None) == keep
    x, noise, labels = inputs()
    out = net(x, noise, labels)
    assert torch.equal(out, net(x, noise + 3.0, (labels + 1) % 10))
    assert torch.equal(out, net(x, noise))


def test_scale_shift_depends_on_noise_labels():
    net = randomize(SmallUNet(cond_mode="scale_shift"))
    x, noise, _ = inputs()
    assert not torch.allclose(net(x, noise), net(x, noise + 1.0))


@pytest.mark.parametrize(
    "mode, num_classes, keep",
    [
        ("scale_shift", 0, True),
        ("scale_shift", 10, True),
        ("both", 10, True),
        ("lora_only", 0, False),
        ("lora_only", 10, False),
    ],
)
def test_every_parameter_gets_a_gradient(mode, num_classes, keep):
    net = randomize(
        SmallUNet(num_classes=num_classes, cond_mode=mode, keep_embedding=keep, dropout=0.1)
    )
    x, noise, labels = inputs()
    net(x, noise, labels if num_classes else None).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_lora_only_kept_embedding_is_only_read_by_hooks():
    net = randomize(SmallUNet(num_classes=10, cond_mode="lora_only", keep_embedding=True))
    x, noise, labels = inputs()
    net(x, noise, labels).square().mean().backward()
    for name, p in net.named_parameters():
        assert (p.grad is None) == name.startswith("embed."), name


def test_patch_size_runs_levels_on_pixel_patches():
    net = randomize(
        SmallUNet(model_channels=8, channel_mult=(1, 2), attn_resolutions=(4,), patch_size=2)
    )
    x, noise, labels = inputs()
    assert net(x, noise, labels).shape == x.shape
    assert net.conv_in.in_channels == 4 and net.conv_out.out_channels == 4  # 2x2 patches
    attn = [m for m in net.modules() if m.__class__.__name__ == "AttnBlock"]
    assert attn  # attention sits at the 4x4 feature maps of a 16x16 input
    # moving one pixel inside its 2x2 patch changes the output: patches are not averaged
    x2 = x.clone()
    x2[:, :, 0, 0], x2[:, :, 0, 1] = x[:, :, 0, 1], x[:, :, 0, 0]
    assert not torch.allclose(net(x2, noise, labels), net(x, noise, labels))
    with pytest.raises(ValueError, match="divisible"):
        SmallUNet(img_resolution=12, channel_mult=(1, 2, 2), patch_size=2)
