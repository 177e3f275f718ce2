"""The wrapper's math against a plain per-basis loop, composers, merge, gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from condlora.core.errors import LoRAError
from condlora.lora import (
    ClassComposer,
    CondLoRALayer,
    LoRAConfig,
    TimeComposer,
    build_composer,
    conditioning,
    hat_table,
)
from condlora.lora.runtime import ConditionState

D_IN, D_OUT, BATCH, EMB = 6, 5, 4, 8


def make_base(kind: str, bias: bool = True) -> nn.Module:
    if kind == "linear":
        return nn.Linear(D_IN, D_OUT, bias=bias)
    if kind == "conv1d":
        return nn.Conv1d(D_IN, D_OUT, 1, bias=bias)
    return nn.Conv2d(D_IN, D_OUT, 1, bias=bias)


def make_input(kind: str) -> torch.Tensor:
    shapes = {"linear": (BATCH, D_IN), "linear3d": (BATCH, 7, D_IN)}
    shapes |= {"conv1d": (BATCH, D_IN, 7), "conv2d": (BATCH, D_IN, 3, 4)}
    return torch.randn(shapes[kind])


def make_layer(kind: str, method: str, bias: bool = True, **cfg) -> CondLoRALayer:
    config = LoRAConfig(method=method, rank=2, num_bases=3, bias=bias, scale=0.7, **cfg)
    config.num_time_rows, config.num_classes, config.mlp_widths, config.mlp_groups = 9, 4, [8], 4
    base = make_base(kind.replace("3d", ""))
    composer = build_composer(config, EMB if method == "uc" else None)
    state = ConditionState(config)
    return CondLoRALayer(
        base, config.rank, composer, state, config.scale, bias, config.bias_per_rank
    )


def randomize(layer: nn.Module, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer."):
                p.normal_()


def make_condition(per_sample: bool = True) -> dict:
    n = BATCH if per_sample else 1
    return {"t": torch.rand(n), "y": torch.randint(0, 4, (n,)), "emb": torch.randn(n, EMB)}


def reference(layer: CondLoRALayer, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """W x + b + s * sum_i w_i (B_i A_i x + E_i), one sample and one basis at a time."""
    base, r = layer.base_layer, layer.rank
    weight = base.weight.reshape(base.weight.shape[0], -1)
    xc = x.movedim(1, -1) if layer.is_conv else x
    out = []
    for n in range(x.shape[0]):
        wn = w[n if w.shape[0] > 1 else 0]
        y = xc[n] @ weight.T + (base.bias if base.bias is not None else 0)
        for i in range(layer.num_bases):
            a_i = layer.lora_A[i * r : (i + 1) * r]
            b_i = layer.lora_B[:, i * r : (i + 1) * r]
            e_i = 0
            if layer.lora_E is not None:  # one row per basis, or r rows per basis summed
                per_rank = layer.lora_E.shape[0] > layer.num_bases
                e_i = layer.lora_E[i * r : (i + 1) * r].sum(0) if per_rank else layer.lora_E[i]
            y = y + layer.scale * wn[i] * (xc[n] @ a_i.T @ b_i.T + e_i)
        out.append(y)
    out = torch.stack(out)
    return out.movedim(-1, 1) if layer.is_conv else out


KINDS = ["linear", "linear3d", "conv1d", "conv2d"]
METHODS = ["time", "class", "uc", "time+class"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_fresh_wrapper_is_base_layer(kind, method):
    layer = make_layer(kind, method)
    x = make_input(kind)
    with conditioning(layer, **make_condition()):
        # low-rank path: the base output comes from a matmul with [W; A] stacked, so it is
        # the base layer's up to the rounding of that wider matmul (exact for the 1x1 convs,
        # and for Linear layers of realistic width; see test_fast_paths.py)
        torch.testing.assert_close(layer(x), layer.base_layer(x), atol=1e-6, rtol=1e-6)
    with conditioning(layer, **make_condition(per_sample=False)), torch.no_grad():
        # merged path (one condition, no gradients): W + 0 and b + 0, bit for bit
        assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("per_sample", [True, False])
def test_wrapper_matches_per_basis_loop(kind, method, per_sample):
    layer = make_layer(kind, method)
    randomize(layer)
    x = make_input(kind)
    with conditioning(layer, **make_condition(per_sample)):
        w = layer.composer(**layer.state.inputs())
        out = layer(x)
    assert w.shape == (BATCH if per_sample else 1, layer.num_bases)
    assert not torch.allclose(out, layer.base_layer(x), atol=1e-3)  # the LoRA path is live
    torch.testing.assert_close(out, reference(layer, x, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear3d", "conv2d"])
def test_per_rank_bias_matches_loop_and_merges(kind):
    layer = make_layer(kind, "uc", bias_per_rank=True)
    assert layer.lora_E.shape == (layer.num_bases * layer.rank, D_OUT)
    randomize(layer)
    x = make_input(kind)
    cond = make_condition(per_sample=False)
    with conditioning(layer, **cond):
        w = layer.composer(**layer.state.inputs())
        out = layer(x)
    torch.testing.assert_close(out, reference(layer, x, w), atol=1e-5, rtol=1e-5)
    layer.merge(w)
    torch.testing.assert_close(layer(x), out, atol=1e-5, rtol=1e-5)


def test_class_float_weights_interpolate_and_extrapolate():
    layer = make_layer("linear", "class")
    randomize(layer)
    x = make_input("linear")[:1]
    eye = torch.eye(4)

    def delta(y):
        with conditioning(layer, y=y):
            return layer(x) - layer.base_layer(x)

    torch.testing.assert_close(delta(torch.tensor([2])), delta(eye[2:3]))
    torch.testing.assert_close(delta(2.0 * eye[1:2]), 2.0 * delta(eye[1:2]), atol=1e-5, rtol=1e-5)
    mix = delta(0.5 * eye[0:1] + 0.5 * eye[3:4])
    torch.testing.assert_close(
        mix, 0.5 * delta(eye[0:1]) + 0.5 * delta(eye[3:4]), atol=1e-5, rtol=0
    )


def test_compositional_class_composer():
    comp = ClassComposer(num_classes=10, class_bases=3)
    y = torch.tensor([0, 7])
    torch.testing.assert_close(comp(y=y), comp.mix[y])
    weights = torch.rand(2, 10)
    torch.testing.assert_close(comp(y=weights), weights @ comp.mix)
    assert comp.num_weights == 3


def test_time_table_init():
    table = hat_table(1000, 11)
    torch.testing.assert_close(table.sum(1), torch.ones(1000))
    cos = F.cosine_similarity(table[1:], table[:-1], dim=1)
    assert cos.min() > 0.99
    centres = torch.linspace(0, 999, 11).round().long()
    torch.testing.assert_close(table[centres], torch.eye(11))


def test_time_composer_interpolates_rows():
    comp = TimeComposer(num_rows=1000, num_bases=11)
    with torch.no_grad():
        comp.omega.normal_()
    k = torch.tensor([0, 1, 500, 998, 999])
    assert torch.equal(comp(t=k.float() / 999), comp.omega[k])
    half = comp(t=torch.tensor([500.5 / 999]))
    torch.testing.assert_close(half[0], 0.5 * (comp.omega[500] + comp.omega[501]))
    assert comp(t=0.25).shape == (1, 11)  # python scalar: batch 1


@pytest.mark.parametrize("kind", ["linear3d", "conv1d", "conv2d"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("base_bias", [True, False])
def test_merge_and_unmerge(kind, method, base_bias):
    layer = make_layer(kind, method)
    if not base_bias:
        layer.base_layer.bias = None
    randomize(layer)
    weight0 = layer.base_layer.weight.detach().clone()
    x = make_input(kind)
    cond = make_condition(per_sample=False)
    with conditioning(layer, **cond):
        expected = layer(x)
        w = layer.composer(**layer.state.inputs())
    layer.merge(w.expand(3, -1))  # equal rows count as one condition
    assert layer.merged and layer.base_layer.bias is not None
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)  # no condition needed
    with pytest.raises(LoRAError, match="already merged"):
        layer.merge(w)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, weight0)  # the saved W, not W + dW - dW
    assert (layer.base_layer.bias is None) == (not base_bias)
    with pytest.raises(LoRAError, match="not merged"):
        layer.unmerge()
    with pytest.raises(LoRAError, match="one condition"):
        layer.merge(torch.randn(2, layer.num_bases))


def test_delta_weight_is_sum_of_bases():
    layer = make_layer("conv2d", "time")
    randomize(layer)
    w = torch.rand(layer.num_bases)
    r = layer.rank
    expected = sum(
        w[i] * layer.lora_B[:, i * r : (i + 1) * r] @ layer.lora_A[i * r : (i + 1) * r]
        for i in range(layer.num_bases)
    )
    dw = layer.get_delta_weight(w)
    assert dw.shape == layer.base_layer.weight.shape
    torch.testing.assert_close(dw[:, :, 0, 0], layer.scale * expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_lora_and_composer(method):
    layer = make_layer("linear3d", method, class_bases=3 if "class" in method else 0)
    randomize(layer)
    with conditioning(layer, **make_condition()):
        layer(make_input("linear3d")).square().sum().backward()
    lora = {n: p for n, p in layer.named_parameters() if not n.startswith("base_layer.")}
    assert {"lora_A", "lora_B", "lora_E"} <= set(lora)
    assert any(n.startswith("composer.") for n in lora)
    for name, p in lora.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_time_plus_class_is_sum_of_two_banks():
    t_layer, c_layer = make_layer("conv1d", "time"), make_layer("conv1d", "class", class_bases=2)
    tc_layer = make_layer("conv1d", "time+class", class_bases=2)
    for seed, layer in enumerate((t_layer, c_layer, tc_layer)):
        randomize(layer, seed)
    base = t_layer.base_layer
    c_layer.base_layer = tc_layer.base_layer = base
    with torch.no_grad():
        tc_layer.lora_A.copy_(torch.cat([t_layer.lora_A, c_layer.lora_A]))
        tc_layer.lora_B.copy_(torch.cat([t_layer.lora_B, c_layer.lora_B], dim=1))
        tc_layer.lora_E.copy_(torch.cat([t_layer.lora_E, c_layer.lora_E]))
        tc_layer.composer.parts["time"].omega.copy_(t_layer.composer.omega)
        tc_layer.composer.parts["cls"].mix.copy_(c_layer.composer.mix)
    x = make_input("conv1d")
    cond = make_condition()
    with conditioning(t_layer, **cond), conditioning(c_layer, **cond):
        expected = t_layer(x) + c_layer(x) - base(x)
    with conditioning(tc_layer, **cond):
        torch.testing.assert_close(tc_layer(x), expected, atol=1e-5, rtol=1e-5)
    with conditioning(tc_layer, t=torch.tensor(0.3), y=cond["y"]):  # t batch 1 broadcasts
        assert tc_layer(x).shape == (BATCH, D_OUT, 7)


@pytest.mark.parametrize(
    ("method", "cond", "message"),
    [
        ("time", {"y": torch.tensor([1])}, "TimeLoRA needs t: wrap the call in `with conditioning"),
        ("class", {"t": 0.5}, "ClassLoRA needs y"),
        ("uc", {"t": 0.5}, "UC-LoRA needs emb"),
        ("class", {"y": torch.tensor([4])}, "out of range"),
        ("class", {"y": torch.rand(1, 3)}, r"shape \(batch, 4\)"),
        ("uc", {"emb": torch.randn(1, 3)}, r"shape \(batch, 8\)"),
        ("time", {"t": torch.rand(3)}, "does not match input batch"),
    ],
)
def test_condition_errors(method, cond, message):
    layer = make_layer("linear", method)
    with pytest.raises(LoRAError, match=message):
        with conditioning(layer, **cond):
            layer(make_input("linear"))


def test_conditioning_nests_and_restores():
    layer = make_layer("linear", "time")
    randomize(layer)
    x = make_input("linear")
    with conditioning(layer, t=0.2):
        outer = layer(x)
        with conditioning(layer, t=0.9):
            assert not torch.allclose(layer(x), outer)
        assert torch.equal(layer(x), outer)
    assert layer.state.t is None
