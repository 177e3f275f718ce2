"""inject / remove / merge on whole models: a tiny attention block and a diffusers UNet2DModel."""

import copy

import pytest
import torch
from torch import nn

from condlora.core.errors import LoRAError
from condlora.lora import (
    METHODS,
    CondLoRALayer,
    LoRAConfig,
    conditioning,
    count_lora_parameters,
    inject,
    lora_layers,
    lora_parameters,
    merge,
    remove,
    unmerge,
)

from .conftest import assert_same_function

C, BATCH = 8, 3


class TinyAttention(nn.Module):
    """Attention-like block: 1x1 Conv2d qkv, 1x1 Conv1d proj, Linear out on (B, L, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Sequential(nn.Linear(1, 16), nn.SiLU(), nn.Linear(16, 16))
        self.qkv = nn.Conv2d(C, 3 * C, 1)
        self.proj = nn.Conv1d(C, C, 1)
        self.out = nn.Linear(C, C)
        self.norm = nn.GroupNorm(2, C)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = self.emb(t[:, None])
        q, k, v = self.qkv(self.norm(x)).flatten(2).chunk(3, dim=1)  # (B, C, HW) each
        attn = torch.softmax(q.transpose(1, 2) @ k / C**0.5, dim=-1)  # (B, HW, HW)
        h = self.proj(v @ attn.transpose(1, 2))  # (B, C, HW)
        h = self.out(h.transpose(1, 2)).transpose(1, 2)  # Linear on (B, HW, C)
        return x + h.reshape(x.shape) + e[:, :C, None, None]


def tiny_config(method: str, **kw) -> LoRAConfig:
    kw = {
        "targets": ["qkv", "proj", "out"],
        "bias": True,
        "num_time_rows": 50,
        "emb_module": "emb",
    } | kw
    return LoRAConfig(method=method, mlp_widths=[16, 8], mlp_groups=4, **kw)


def randomize(model: nn.Module) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.3)


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(BATCH, C, 4, 4, generator=g), "t": torch.rand(BATCH, generator=g)}


def cond(t: torch.Tensor) -> dict:
    return {"t": t, "y": torch.arange(BATCH) % 10}


@pytest.mark.parametrize("method", METHODS)
def test_fresh_injection_keeps_tiny_model_output(method):
    """Bit for bit when sampling (no gradients, one condition for the batch: the merged path,
    where W + 0 is W); to float rounding in training mode, where [W; A] is one stacked matmul
    whose kernel blocking differs from W's alone on some CPUs."""
    torch.manual_seed(0)
    model = TinyAttention()
    data = inputs()
    expected = model(**data)
    shared = {"x": data["x"], "t": data["t"][:1]}  # one noise level (and class) for all
    with torch.no_grad():
        expected_shared = model(**shared)
    names = inject(model, tiny_config(method))
    assert names == ([] if method == "none" else ["out", "proj", "qkv"])
    with conditioning(model, **cond(data["t"])):
        torch.testing.assert_close(model(**data), expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad(), conditioning(model, t=shared["t"], y=torch.full((BATCH,), 3)):
        assert torch.equal(model(**shared), expected_shared)


def test_lora_changes_output_and_uc_uses_captured_emb():
    torch.manual_seed(0)
    model = TinyAttention()
    data = inputs()
    base = model(**data)
    inject(model, tiny_config("uc"))
    assert model.qkv.composer.emb_dim == 16  # inferred from emb's last Linear
    randomize(model)
    out = model(**data)  # emb captured by the hook, no `conditioning` needed
    assert not torch.allclose(out, base, atol=1e-3)
    explicit = model.emb(data["t"][:, None]).detach()
    with conditioning(model, emb=explicit):
        torch.testing.assert_close(model(**data), out)
    with conditioning(model, emb=torch.zeros_like(explicit)):  # explicit emb takes precedence
        assert not torch.allclose(model(**data), out, atol=1e-3)
    assert model.qkv.state.captured_emb is None  # dropped after the pass
    with pytest.raises(LoRAError, match="'emb' has not run yet"):
        model.qkv(data["x"])  # a wrapper called outside the host's forward
    copy.deepcopy(model)  # no graph tensor held, so the model still deep-copies


@pytest.mark.parametrize("method", ["time", "uc", "time+class"])
def test_merge_unmerge_remove(method):
    torch.manual_seed(0)
    model = TinyAttention()
    data = inputs()
    data["t"] = torch.full((BATCH,), 0.4)  # one condition for the whole batch
    base_out = model(**data)
    originals = {n: model.get_submodule(n) for n in ["qkv", "proj", "out"]}
    saved = {n: (m.weight.clone(), m.bias.clone()) for n, m in originals.items()}
    inject(model, tiny_config(method))
    randomize(model)
    emb = model.emb(data["t"][:1, None]).detach()
    with conditioning(model, t=0.4, y=torch.tensor([2]), emb=emb):
        expected = model(**data)
    merge(model, t=0.4, y=torch.tensor([2]), emb=emb)
    torch.testing.assert_close(model(**data), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(LoRAError, match="already merged"):
        merge(model, t=0.4, y=torch.tensor([2]), emb=emb)
    unmerge(model)
    for name, (weight, bias) in saved.items():
        assert torch.equal(originals[name].weight, weight)  # restored, not recomputed
        assert torch.equal(originals[name].bias, bias)
    with pytest.raises(LoRAError, match="not merged"):
        unmerge(model)
    merge(model, t=0.4, y=torch.tensor([2]), emb=emb)  # remove also unmerges
    remove(model)
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert not lora_layers(model) and not model._forward_hooks and not model._forward_pre_hooks
    assert not model.emb._forward_hooks
    assert torch.equal(model(**data), base_out)


def test_conditioning_follows_inject_remove_and_copies():
    """`conditioning` keeps each model's states between calls; inject / remove and copies
    must still reach exactly the wrappers the model holds now."""
    torch.manual_seed(0)
    model = TinyAttention()
    with conditioning(model, t=0.3):  # no LoRA yet: nothing to set (and cached so)
        pass
    inject(model, tiny_config("time"))
    state = model.qkv.state
    with conditioning(model, t=0.3):
        torch.testing.assert_close(state.t, torch.tensor([0.3]))
    twin = copy.deepcopy(model)
    with conditioning(twin, t=0.7):
        torch.testing.assert_close(twin.qkv.state.t, torch.tensor([0.7]))
        assert state.t is None  # the original's condition is untouched
    remove(model)
    with conditioning(model, t=0.9):
        assert state.t is None  # the removed wrappers are no longer the model's
    inject(model, tiny_config("time"))
    with conditioning(model, t=0.2):
        torch.testing.assert_close(model.qkv.state.t, torch.tensor([0.2]))


def test_merge_needs_one_condition():
    model = TinyAttention()
    inject(model, tiny_config("time"))
    with pytest.raises(LoRAError, match="one condition"):
        merge(model, t=torch.tensor([0.1, 0.9]))
    assert not any(layer.merged for layer in lora_layers(model).values())


def test_parameter_count():
    model = TinyAttention()
    inject(model, tiny_config("time", rank=2, num_bases=3))
    # per layer: A (m r, d_in) + B (d_out, m r) + E (m, d_out) + Omega (T, m)
    per = {"qkv": (C, 3 * C), "proj": (C, C), "out": (C, C)}
    expected = sum(6 * i + o * 6 + 3 * o + 50 * 3 for i, o in per.values())
    assert count_lora_parameters(model) == expected
    assert all(p.requires_grad for p in model.parameters())  # base stays trainable


def test_target_matching_exact_suffix_regex():
    model = nn.Sequential(TinyAttention(), TinyAttention())
    assert inject(model, tiny_config("time", targets=["0.qkv", "proj"])) == [
        "0.proj",
        "0.qkv",
        "1.proj",
    ]
    remove(model)
    assert inject(model, tiny_config("time", targets=[r"1\.(qkv|out)"])) == ["1.out", "1.qkv"]


@pytest.mark.parametrize(
    ("model", "config", "message"),
    [
        (
            TinyAttention(),
            lambda: tiny_config("film"),
            "valid: none, time, class, uc, time\\+class",
        ),
        (TinyAttention(), lambda: tiny_config("time", targets=["to_q"]), r"\['to_q'\].*qkv"),
        (nn.Sequential(nn.Conv2d(4, 4, 3)), lambda: tiny_config("time", targets=["0"]), "1x1"),
        (
            nn.Sequential(nn.Conv2d(4, 4, 1, groups=2)),
            lambda: tiny_config("time", targets=["0"]),
            "1x1",
        ),
        (
            TinyAttention(),
            lambda: tiny_config("time", targets=["norm"]),
            "GroupNorm.*only nn.Linear",
        ),
        (TinyAttention(), lambda: tiny_config("uc", emb_module="embed"), "not in the model.*'emb'"),
        (
            TinyAttention(),
            lambda: LoRAConfig(method="uc", mlp_widths=[10], mlp_groups=4, emb_dim=3),
            "mlp_groups=4",
        ),
    ],
)
def test_inject_errors(model, config, message):
    # a config refuses a bad method or GroupNorm width when built; inject the rest
    with pytest.raises(LoRAError, match=message):
        inject(model, config())
    assert not lora_layers(model)  # nothing half-injected


def test_inject_twice_fails():
    model = TinyAttention()
    inject(model, tiny_config("time"))
    with pytest.raises(LoRAError, match="already has LoRA"):
        inject(model, tiny_config("class"))


def small_unet() -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()


@pytest.mark.parametrize("method", METHODS)
def test_diffusers_unet(method, one_thread):
    unet = small_unet()
    x, steps = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    with torch.no_grad():
        expected = unet(x, steps).sample
        config = LoRAConfig(method=method, targets=["to_q", "to_k", "to_v", "to_out.0"], bias=True)
        config.emb_module, config.mlp_widths = "time_embedding", [32, 16]
        names = inject(unet, config)
        if method != "none":
            # 4 attention blocks: 1 down, 1 mid, 2 up (layers_per_block + 1)
            assert len(names) == 16
            assert all(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in names)
            assert all(isinstance(unet.get_submodule(n), CondLoRALayer) for n in names)
        t = steps / 999
        with conditioning(unet, t=t, y=torch.tensor([1, 7])):  # per sample: low-rank path
            assert_same_function(unet(x, steps).sample, expected)
            randomize(unet)
            changed = unet(x, steps).sample
        if method != "none":
            assert not torch.allclose(changed, expected, atol=1e-4)
        remove(unet)
        assert torch.equal(unet(x, steps).sample, expected)
