"""The fast paths compute the plain formula: the stacked low-rank autograd function, the
batched composers, the merged weight at sampling, and class-grouped generation."""

import copy

import pytest
import torch
from torch import nn

import condlora.lora.layer as layer_module
from condlora.diffusion import sample
from condlora.image.build import build_denoiser
from condlora.image.config import load_config
from condlora.image.generate import class_groups, generate
from condlora.lora import (
    ClassComposer,
    CondLoRALayer,
    LoRAConfig,
    TimeComposer,
    UCComposer,
    conditioning,
    inject,
    lora_layers,
    lora_parameters,
    lora_state_dict,
)
from condlora.lora.composers import ParameterStacks
from condlora.lora.layer import StackedLoRA
from condlora.lora.runtime import ConditionState

from .conftest import CONFIGS
from .test_lora import make_condition, make_input, make_layer, randomize, reference
from .test_lora_inject import BATCH, TinyAttention, inputs, tiny_config

# --- the stacked low-rank function -------------------------------------------------------


@pytest.mark.parametrize("layout", ["rows", "conv1d", "conv2d"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("w_batch", [1, 3])
def test_stacked_lora_gradients(layout, with_bias, w_batch):
    """Analytic gradients of every input against finite differences (float64)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"rows": (3, 5, 4), "conv1d": (3, 4, 5), "conv2d": (3, 4, 2, 3)}

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    x, weight, lora_a, lora_b = rand(*shapes[layout]), rand(6, 4), rand(2, 4), rand(6, 2)
    bias = rand(6) if with_bias else None
    ws, extra = rand(w_batch, 1, 2), rand(w_batch, 1, 6) if with_bias else None
    args = (x, layout != "rows", weight, bias, lora_a, lora_b, ws, extra)
    assert torch.autograd.gradcheck(StackedLoRA.apply, args)


@pytest.mark.parametrize("kind", ["linear3d", "conv1d", "conv2d"])
@pytest.mark.parametrize("base_trainable", [True, False])
def test_layer_gradients_match_plain_formula(kind, base_trainable):
    """Every gradient of the wrapper (x, W, b, A, B, E, composer) against the per-basis loop."""
    layer = make_layer(kind, "uc", bias_per_rank=True)
    randomize(layer)
    layer.double().base_layer.requires_grad_(base_trainable)
    x = make_input(kind).double()
    if kind == "conv2d":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    target = torch.randn(reference(layer, x.detach(), torch.ones(1, 3)).shape).double()
    cond = make_condition()
    cond["emb"] = cond["emb"].double()
    with conditioning(layer, **cond):
        got = torch.autograd.grad((layer(x) * target).sum(), params)
        w = layer.composer(**layer.state.inputs())
        want = torch.autograd.grad((reference(layer, x, w) * target).sum(), params)
    assert len(got) == (12 if base_trainable else 10)  # x, W, b, A, B, E, 6 of the MLP
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_linear_of_realistic_width_computes_the_base_layer():
    """A fresh Linear of width 32+ on (batch, tokens, channels): the stacked matmul's first
    d_out outputs are the base layer's, to the rounding of a wider matmul (bit for bit on
    some kernels, not on all)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32))
    x = torch.randn(2, 16, 32)
    expected = model(x)
    inject(model, LoRAConfig(method="time", num_bases=4, targets=["0", "2"]))
    with conditioning(model, t=torch.tensor([0.2, 0.7])):
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


# --- composers: all layers at once --------------------------------------------------------


def _mixed_composers(kind):
    torch.manual_seed(1)
    if kind == "time":
        composers = [TimeComposer(9, 3) for _ in range(3)]
    elif kind == "class":
        composers = [ClassComposer(4, class_bases=3) for _ in range(3)]
    else:
        composers = [UCComposer(8, [8, 4], 2, 3) for _ in range(3)]
    for c in composers:
        with torch.no_grad():
            for p in c.parameters():
                p.normal_()
    return composers


def _plain(composer, kind, cond):
    """The composer's formula written out (UC: its nn.Sequential run as is)."""
    if kind == "time":
        pos = cond["t"] * (composer.omega.shape[0] - 1)
        i0 = pos.floor().long().clamp(max=composer.omega.shape[0] - 2)
        frac = (pos - i0)[:, None]
        return composer.omega[i0] * (1 - frac) + composer.omega[i0 + 1] * frac
    if kind == "class":
        return composer.mix[cond["y"]]
    return composer.mlp(cond["emb"])


@pytest.mark.parametrize("kind", ["time", "class", "uc"])
def test_batched_composers_match_each_composer(kind):
    composers = _mixed_composers(kind)
    cond = {"t": torch.tensor([0.1, 0.55, 0.9]), "y": torch.tensor([0, 3, 1])}
    cond["emb"] = torch.randn(3, 8)
    batched = type(composers[0]).batched(composers, **cond)
    assert batched.shape == (3, 3, 3)  # (layers, batch, m)
    plain = torch.stack([_plain(c, kind, cond) for c in composers])
    torch.testing.assert_close(batched, plain, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(plain)
    params = [p for c in composers for p in c.parameters()]
    got = torch.autograd.grad((batched * weights).sum(), params)
    want = torch.autograd.grad((plain * weights).sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["time", "uc", "time+class"])
def test_one_batched_composer_call_per_forward_pass(method, monkeypatch):
    torch.manual_seed(0)
    model = TinyAttention()
    inject(model, tiny_config(method))
    randomize_lora(model)
    data = inputs()
    cond = {"t": data["t"], "y": torch.tensor([1, 4, 2])}
    calls = []
    composer_cls = type(lora_layers(model)["qkv"].composer)
    batched = composer_cls.batched

    def counting(composers, **kw):
        calls.append(len(composers))
        return batched(composers, **kw)

    monkeypatch.setattr(composer_cls, "batched", staticmethod(counting))
    with conditioning(model, **cond):
        out = model(**data)
        assert calls == [3]  # the three wrapped layers, once
        monkeypatch.setattr(ConditionState, "begin_pass", lambda self: None)  # no pass scope
        alone = model(**data)  # each layer runs its own composer
    assert calls[1:] == [1] * 3
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)


def randomize_lora(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.3)


def test_weights_of_one_pass_are_not_reused_by_the_next():
    """Two training steps inside one `conditioning` block: the second pass sees the updated
    parameters and backpropagates through its own graph."""
    torch.manual_seed(0)
    model = TinyAttention()
    inject(model, tiny_config("time+class"))
    randomize_lora(model)
    data = inputs()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with conditioning(model, t=data["t"], y=torch.tensor([1, 4, 2])):
        for _ in range(2):
            model(**data).square().sum().backward()
            opt.step()
            opt.zero_grad()
        again = model(**data)
    fresh = copy.deepcopy(model)
    with conditioning(fresh, t=data["t"], y=torch.tensor([1, 4, 2])):
        torch.testing.assert_close(again, fresh(**data))


def test_parameter_stacks_are_reused_only_while_the_parameters_are_unchanged():
    first_layer, second_layer = nn.Linear(3, 2), nn.Linear(3, 2)
    layers = [first_layer, second_layer]
    a, b = first_layer.weight, second_layer.weight
    stacks = ParameterStacks()
    with torch.no_grad():
        first = stacks(layers, "weight")
        assert stacks(layers, "weight") is first and torch.equal(first, torch.stack([a, b]))
        assert torch.equal(stacks(layers, "weight", cat=True), torch.cat([a, b]))
        assert torch.equal(stacks(layers, "bias"), torch.stack([l.bias for l in layers]))
        a.add_(1.0)  # an optimizer or EMA step: in place, a new version
        assert torch.equal(stacks(layers, "weight"), torch.stack([a, b]))
        b.data = torch.zeros(2, 3)  # new storage
        assert torch.equal(stacks(layers, "weight")[1], torch.zeros(2, 3))
        second_layer.weight = nn.Parameter(torch.ones(2, 3))  # a new parameter object
        assert torch.equal(stacks(layers, "weight")[1], torch.ones(2, 3))
        nested = [nn.Sequential(first_layer), nn.Sequential(second_layer)]  # a path of names
        assert torch.equal(stacks(nested, "0.weight"), torch.stack([a, second_layer.weight]))
    stacked = stacks(layers, "weight")  # with gradients: a fresh stack in the graph
    assert stacked.requires_grad and stacked.grad_fn is not None
    assert copy.deepcopy(stacks)._cache == {}


@pytest.mark.parametrize("method", ["time", "class", "uc", "time+class"])
def test_a_shared_condition_is_composed_once_and_matches_the_batch(method):
    """Sampling (no gradients, one condition for the batch): the composers run on one row,
    and every layer's output is what the same condition gives on the low-rank path."""
    torch.manual_seed(0)
    model = TinyAttention()
    inject(model, tiny_config(method))
    randomize_lora(model)
    x = inputs()["x"]
    t, y = torch.full((BATCH,), 0.3), torch.full((BATCH,), 4)
    rows = []
    composer_cls = type(lora_layers(model)["qkv"].composer)
    batched = composer_cls.batched

    def recording(composers, **kw):
        out = batched(composers, **kw)
        rows.append(out.shape[1])
        return out

    with conditioning(model, t=t, y=y):
        expected = model(x, t)  # gradients on: the full batch, low-rank path
        composer_cls.batched = staticmethod(recording)
        try:
            with torch.no_grad():
                got = model(x, t)
        finally:
            composer_cls.batched = staticmethod(batched)
    assert rows == [1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_state_dict_names_are_unchanged():
    """LoRA files and checkpoints keep their tensor names (per layer, nothing batched)."""
    model = TinyAttention()
    inject(model, tiny_config("uc"))
    names = {k for k in lora_state_dict(model) if k.startswith("qkv.")}
    mlp = [f"qkv.composer.mlp.{i}.{p}" for i in (0, 1, 3, 4, 6) for p in ("weight", "bias")]
    assert names == {"qkv.lora_A", "qkv.lora_B", "qkv.lora_E", *mlp}


# --- merged sampling ----------------------------------------------------------------------


def test_merging_only_where_it_is_cheaper():
    layer = make_layer("linear", "time")
    layer.base_layer = nn.Linear(512, 512)
    layer.lora_A = nn.Parameter(torch.randn(6, 512))
    layer.lora_B = nn.Parameter(torch.randn(512, 6))
    layer.lora_E = nn.Parameter(torch.randn(3, 512))
    merged = []
    fast_path = layer._forward_merged
    layer._forward_merged = lambda *a: merged.append(1) or fast_path(*a)
    with torch.no_grad(), conditioning(layer, t=0.3):
        layer(torch.randn(4, 512))  # 4 * 1024 + MERGE_OVERHEAD < 512 * 512: low-rank
        assert not merged
        layer(torch.randn(256, 512))  # 256 * 1024 + MERGE_OVERHEAD >= 512 * 512: merged
        assert merged
    small = nn.Linear(64, 64)  # narrow layers merge even for a few rows (the small ops cost)
    assert layer_module.merge_pays(4, small.in_features, small.out_features)


class SameShapes(nn.Module):
    """Three Linear(8, 8) (one merge group) and a 1x1 Conv1d of the same width (another)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.d = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.c = nn.Conv1d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(self.a(x))  # (B, L, 8)
        return self.d(self.c(h.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("bias_per_rank", [False, True])
def test_merged_weights_of_a_group_match_each_layer_alone(bias_per_rank, monkeypatch):
    """In a forward pass the wrappers of one shape form W + dW and b + db together (one
    batched call per group); each equals what the wrapper forms alone and the plain formula
    W + s B diag(w ⊗ 1_r) A, b + s (w ⊗ 1_r or w) E, to float64 rounding."""
    torch.manual_seed(0)
    model = SameShapes().double()
    config = LoRAConfig(
        method="time+class", targets=["a", "b", "c", "d"], rank=2, num_bases=3, scale=0.7,
        bias=True, bias_per_rank=bias_per_rank, num_time_rows=20, num_classes=4,
    )  # fmt: skip
    inject(model, config)
    randomize_lora(model)
    layers = lora_layers(model)
    groups = []
    merged_group = CondLoRALayer.merged_group

    def recording(group, *args):
        groups.append(sorted(n for n, layer in layers.items() if layer in group))
        return merged_group(group, *args)

    monkeypatch.setattr(CondLoRALayer, "merged_group", staticmethod(recording))
    state = layers["a"].state
    with torch.no_grad(), conditioning(model, t=0.35, y=2):
        out = model(torch.randn(2, 5, 8, dtype=torch.float64))  # a sampling pass merges
        state.begin_pass()  # the weights of one pass, as the layers take them
        batched = {n: state.merged_weights(layer.index) for n, layer in layers.items()}
        state.end_pass()
        alone = {n: state.merged_weights(layer.index) for n, layer in layers.items()}
        composed = {n: layer.composer(t=state.t, y=state.y)[0] for n, layer in layers.items()}
    assert out.shape == (2, 5, 8)
    assert sorted(groups[:2]) == [["a", "b", "d"], ["c"]]  # the pass: one call per group
    for name, layer in layers.items():
        w, r, s = composed[name], layer.rank, layer.scale
        ws = w.repeat_interleave(r)
        base = layer.base_layer
        weight = base.weight.flatten(1) + s * layer.lora_B @ torch.diag(ws) @ layer.lora_A
        bias = base.bias + s * (ws if bias_per_rank else w) @ layer.lora_E
        for got in (batched[name], alone[name]):
            torch.testing.assert_close(got[0].flatten(1), weight, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got[1], bias, rtol=1e-12, atol=1e-12)


METHOD_OVERRIDES = {
    "time": ["lora.method=time"],
    "class": ["lora.method=class"],
    "time+class": ["lora.method=time+class"],
    "uc": ["lora.method=uc", "lora.mlp_widths=[16, 8]"],
}


@pytest.mark.parametrize("method", list(METHOD_OVERRIDES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grouped", [False, True])
def test_merged_sampling_gives_the_same_samples(
    method, bias, grouped, tiny_overrides, monkeypatch, one_thread
):
    """Acceptance: the same seed gives the same samples (1e-4) with the merged fast path
    and with the low-rank path only, for per-sample and for grouped classes."""
    overrides = tiny_overrides + METHOD_OVERRIDES[method] + [f"lora.bias={str(bias).lower()}"]
    cfg = load_config(CONFIGS / "digits-uclora.yaml", overrides)
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg).eval()
    randomize_lora(denoiser)
    labels = torch.full((8,), 3) if grouped else torch.arange(8) % 4
    merges = []
    fast_path = CondLoRALayer._forward_merged

    def counting(layer, *args):
        merges.append(1)
        return fast_path(layer, *args)

    monkeypatch.setattr(CondLoRALayer, "_forward_merged", counting)
    fast = generate(denoiser, cfg, 8, labels, seed=5, batch_size=4)
    assert merges  # the fast path ran
    monkeypatch.setattr(layer_module, "merge_pays", lambda *args: False)
    count = len(merges)
    slow = generate(denoiser, cfg, 8, labels, seed=5, batch_size=4)
    assert len(merges) == count  # and here it did not
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["time+class", "uc"])
def test_both_paths_run_under_bf16_autocast(method, tiny_overrides, one_thread):
    """`train.mixed_precision=bf16`: training and merged sampling under CPU autocast."""
    cfg = load_config(CONFIGS / "digits-uclora.yaml", tiny_overrides + METHOD_OVERRIDES[method])
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg)
    randomize_lora(denoiser)
    x, labels = torch.rand(4, 1, 16, 16) * 2 - 1, torch.tensor([1, 2, 3, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = denoiser.loss(x, class_labels=labels)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in lora_parameters(denoiser))
    denoiser.eval()
    with torch.no_grad():
        full = denoiser(x, 1.0, class_labels=torch.full((4,), 3))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = denoiser(x, 1.0, class_labels=torch.full((4,), 3))
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.05)


# --- class-grouped generation -------------------------------------------------------------


def test_class_groups_cover_every_sample_once():
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 2])
    groups = class_groups(labels, batch_size=2)
    assert [labels[g].unique().numel() for g in groups] == [1] * len(groups)
    assert sorted(torch.cat(groups).tolist()) == list(range(7))
    assert [g.tolist() for g in groups] == [[1, 4], [3], [0, 2], [5, 6]]
    weights = torch.eye(3)[labels] * 0.5  # class weights group by equal rows too
    assert [g.tolist() for g in class_groups(weights, 2)] == [[0, 2], [5, 6], [3], [1, 4]]


def test_grouped_generation_keeps_each_samples_noise(tiny_overrides, one_thread):
    """Heun is deterministic: sample i is the image of its own starting noise, whichever
    batch it lands in; the images come back in the requested order."""
    cfg = load_config(CONFIGS / "digits-classlora.yaml", tiny_overrides)
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg).eval()
    randomize_lora(denoiser)
    labels = torch.tensor([3, 1, 3, 0, 1])
    images = generate(denoiser, cfg, 5, labels, seed=2, batch_size=3)
    generator = torch.Generator().manual_seed(2)  # starting noise: request order, 3 at a time
    noise = torch.cat([torch.randn(n, 1, 16, 16, generator=generator) for n in (3, 2)])
    for i in range(5):
        one = sample(
            denoiser,
            (1, 1, 16, 16),
            steps=cfg.diffusion.sample_steps,
            noise=noise[i : i + 1],
            class_labels=labels[i : i + 1],
        )
        torch.testing.assert_close(images[i : i + 1], one.clamp(-1, 1), atol=1e-4, rtol=0)


def test_batches_that_share_their_class_are_sampled_as_before(tiny_overrides, one_thread):
    """Nothing to regroup: every draw of the generator is the one it was (ddpm is stochastic)."""
    overrides = tiny_overrides + ["diffusion.sampler=ddpm"]
    cfg = load_config(CONFIGS / "digits-classlora.yaml", overrides)
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg).eval()
    labels = torch.tensor([1, 1, 1, 4, 4])
    images = generate(denoiser, cfg, 5, labels, seed=4, batch_size=3)
    generator = torch.Generator().manual_seed(4)
    expected = [
        sample(denoiser, (len(c), 1, 16, 16), "ddpm", 3, generator, class_labels=c)
        for c in (labels[:3], labels[3:])
    ]
    assert torch.equal(images, torch.cat(expected).clamp(-1, 1))
