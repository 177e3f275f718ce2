"""LoRA files against peft's and diffusers' own savers and loaders, on a tiny U-Net.

Files that peft and diffusers write read back with their scale; files that condlora writes
load through peft and diffusers (kohya included) and change the U-Net's output exactly as
W + dW computed by hand.
"""

import copy
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from diffusers.loaders import StableDiffusionLoraLoaderMixin as Pipeline  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from condlora.lora.formats import LoRAWeights, make_module, read_lora, write_lora  # noqa: E402

from .conftest import merged_by_hand, tiny_unet2d_condition  # noqa: E402

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
# module -> (rank, alpha); conv1 is a 3x3 conv, conv_shortcut a 1x1 conv
TARGETS = {
    f"{ATTN}.attn1.to_q": (1, 27),
    f"{ATTN}.attn2.to_k": (2, 27),
    f"{ATTN}.attn1.to_out.0": (1, 27),
    f"{ATTN}.ff.net.2": (3, 5),
    "down_blocks.0.attentions.0.proj_in": (2, 7),
    "down_blocks.0.resnets.0.conv1": (1, 27),
    "up_blocks.0.resnets.0.time_emb_proj": (1, 3),
    "up_blocks.0.resnets.0.conv_shortcut": (2, 27),
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": (1, 27),
}


@pytest.fixture(scope="module")
def unet():
    return tiny_unet2d_condition()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 500]),
        torch.randn(2, 3, 8, generator=g),
    )


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


def random_lora(unet, uniform_alpha=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = dict(unet.named_modules())
    modules = {}
    for name, (rank, alpha) in TARGETS.items():
        w = weights[name].weight
        conv = w.dim() == 4
        A = 0.2 * torch.randn((rank, *w.shape[1:]) if conv else (rank, w.shape[1]), generator=g)
        B = 0.2 * torch.randn((w.shape[0], rank, 1, 1) if conv else (w.shape[0], rank), generator=g)
        modules[name] = make_module(name, A, B, (uniform_alpha or alpha) / rank, "test")
    return LoRAWeights(modules)


def peft_deltas(model):
    """dW of every LoRA layer of a peft-injected model, computed by peft."""
    return {
        name.removeprefix("base_model.model."): layer.get_delta_weight("default")
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
    }


def randomise(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def assert_strict(path):
    """`lora info --strict` accounts for every key of the file."""
    from condlora.cli import main

    assert main(["lora", "info", "--strict", str(path)]) == 0


def assert_loaded(model, lora):
    """The loader made a LoRA layer of every module of the file, with its dW, and no other
    (100% of the file's keys used)."""
    layers = {
        name.removeprefix("base_model.model."): layer
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
    }
    assert sorted(layers) == sorted(lora.modules)
    for name, layer in layers.items():
        want = lora.modules[name].delta()
        got = layer.get_delta_weight(layer.active_adapters[0]).detach().reshape(want.shape)
        assert float((got - want).norm() / want.norm()) < 1e-5, name


def assert_deltas(lora, expected):
    assert sorted(lora.modules) == sorted(expected)
    for name, want in expected.items():
        err = (lora.modules[name].delta() - want).norm() / want.norm()
        assert err < 1e-6, (name, float(err))


PEFT_CONFIGS = {
    "patterns": dict(
        r=1,
        lora_alpha=27,
        target_modules=["to_q", "to_k", "to_out.0", "proj_in", "conv1"],
        rank_pattern={"proj_in": 2, "conv1": 3},
        alpha_pattern={"to_k": 6},
    ),
    "rslora": dict(r=4, lora_alpha=27, target_modules=["to_v", "conv2"], use_rslora=True),
}


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_files_from_peft_save_pretrained_read_with_their_scale(unet, kind, tmp_path):
    model = get_peft_model(copy.deepcopy(unet), LoraConfig(**PEFT_CONFIGS[kind]))
    randomise(model)
    model.save_pretrained(tmp_path)
    assert_strict(tmp_path)  # every key of the file accounted for
    lora = read_lora(tmp_path)
    expected = peft_deltas(model)
    assert_deltas(lora, expected)
    scales = {m.scale for m in lora.modules.values()}
    assert scales == ({27.0, 13.5, 9.0, 6.0} if kind == "patterns" else {27 / 2})


def test_files_from_diffusers_savers_read_with_their_scale(unet, tmp_path):
    config = LoraConfig(r=1, lora_alpha=27, target_modules=["to_q", "to_out.0", "conv1"])
    model = copy.deepcopy(unet)
    model.add_adapter(config)
    randomise(model)
    expected = peft_deltas(model)
    layers = get_peft_model_state_dict(model)
    metadata = {k: v for k, v in config.to_dict().items() if k in ("r", "lora_alpha")}
    Pipeline.save_lora_weights(tmp_path / "p", layers, unet_lora_adapter_metadata=metadata)
    assert_deltas(read_lora(tmp_path / "p"), expected)
    model.save_lora_adapter(tmp_path / "m")  # keys without the unet. prefix
    assert_deltas(read_lora(tmp_path / "m"), expected)
    # no metadata, no alpha entries: diffusers assumes alpha = r (scale 1), and so do we
    Pipeline.save_lora_weights(tmp_path / "bare", layers)
    for folder in ("p", "m", "bare"):
        assert_strict(tmp_path / folder)
    bare = read_lora(tmp_path / "bare")
    assert {m.scale for m in bare.modules.values()} == {1.0}
    assert_deltas(bare, {k: v / 27 for k, v in expected.items()})


def test_condlora_files_load_in_peft_and_diffusers_as_w_plus_dw(unet, inputs, tmp_path):
    lora = random_lora(unet)
    reference = run(merged_by_hand(unet, lora), inputs)
    assert (reference - run(unet, inputs)).abs().max() > 0.05  # the LoRA does change the output

    write_lora(lora, tmp_path / "peft", "peft")
    model = PeftModel.from_pretrained(copy.deepcopy(unet), tmp_path / "peft").eval()
    assert_loaded(model, lora)
    torch.testing.assert_close(run(model, inputs), reference, atol=1e-5, rtol=0)

    write_lora(lora, tmp_path / "diffusers", "diffusers")
    model = copy.deepcopy(unet)
    model.load_lora_adapter(
        tmp_path / "diffusers", weight_name="pytorch_lora_weights.safetensors", prefix="unet"
    )
    assert_loaded(model, lora)
    torch.testing.assert_close(run(model, inputs), reference, atol=1e-5, rtol=0)

    # what a pipeline's load_lora_weights does with the file
    state, alphas, meta = Pipeline.lora_state_dict(
        tmp_path / "diffusers", return_lora_metadata=True
    )
    model = copy.deepcopy(unet)
    Pipeline.load_lora_into_unet(state, alphas, model, metadata=meta)
    assert_loaded(model, lora)
    torch.testing.assert_close(run(model, inputs), reference, atol=1e-5, rtol=0)


def test_condlora_kohya_files_load_through_diffusers_kohya_conversion(unet, inputs, tmp_path):
    # diffusers 0.42 names the alphas of attention projections after their old processor
    # keys, so only a file-wide alpha reaches them: kohya files have one (ranks may differ)
    lora = random_lora(unet, uniform_alpha=27)
    reference = run(merged_by_hand(unet, lora), inputs)
    write_lora(lora, tmp_path / "k.safetensors", "kohya")
    state, alphas = Pipeline.lora_state_dict(tmp_path / "k.safetensors")
    assert set(alphas.values()) == {27.0}
    model = copy.deepcopy(unet)
    Pipeline.load_lora_into_unet(state, alphas, model)
    assert_loaded(model, lora)
    torch.testing.assert_close(run(model, inputs), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "corda", "loftq", "loftq_cfg"])
def test_adapters_that_change_the_base_weights_are_refused(init, tmp_path, capsys):
    from condlora.cli import main

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    if init in ("pissa", "pissa_niter_2", "olora"):  # peft itself writes these
        config = LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=init)
        get_peft_model(model, config).save_pretrained(tmp_path)
    else:
        write_lora(random_lora(tiny_unet2d_condition()), tmp_path, "peft")
        path = tmp_path / "adapter_config.json"
        config = json.loads(path.read_text())
        if init == "loftq_cfg":
            config["loftq_config"] = {"loftq_bits": 4, "loftq_iter": 1}
        else:
            config["init_lora_weights"] = init
        path.write_text(json.dumps(config))
    assert main(["lora", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("condlora: error: ") and err.count("\n") == 1
    assert "loftq_config" in err if init == "loftq_cfg" else "changes the base weights" in err


@pytest.mark.filterwarnings("ignore:PiSSA changes the base weights")
def test_pissa_converted_by_peft_reads_as_plain_lora(tmp_path):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["0", "1"], init_lora_weights="pissa")
    model = get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path / "init")  # the adapter as initialised (base weights changed)
    randomise(model)
    # peft's own conversion: a plain LoRA of rank 2r on the original base weights
    model.save_pretrained(
        tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init"
    )
    assert_strict(tmp_path / "plain")
    lora = read_lora(tmp_path / "plain")
    x = torch.randn(3, 8)
    with torch.no_grad():
        merged = copy.deepcopy(base)
        for name, m in lora.modules.items():
            dict(merged.named_modules())[name].weight += m.delta()
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=0)


KOHYA_SOURCES = {
    "alpha_pattern": dict(
        r=2,
        lora_alpha=8,
        target_modules=["to_q", "to_k", "to_out.0", "proj_in", "conv1"],
        rank_pattern={"proj_in": 3, "conv1": 1},
        alpha_pattern={"to_k": 3, "conv1": 5},
    ),
    "rslora_mixed_ranks": dict(
        r=4,
        lora_alpha=6,
        target_modules=["to_q", "to_v", "conv2"],
        rank_pattern={"to_v": 1, "conv2": 2},
        use_rslora=True,
    ),
}


@pytest.mark.parametrize("kind", sorted(KOHYA_SOURCES))
def test_per_module_alphas_survive_diffusers_kohya_loader(unet, inputs, kind, tmp_path):
    model = get_peft_model(copy.deepcopy(unet), LoraConfig(**KOHYA_SOURCES[kind]))
    randomise(model)
    model.save_pretrained(tmp_path / "peft")
    lora = read_lora(tmp_path / "peft")
    assert len({m.scale * m.rank for m in lora.modules.values()}) > 1  # alphas do differ
    write_lora(lora, tmp_path / "k.safetensors", "kohya")
    state, alphas = Pipeline.lora_state_dict(tmp_path / "k.safetensors")
    assert len(set(alphas.values())) == 1  # one alpha for the file, as diffusers applies it
    loaded = copy.deepcopy(unet)
    Pipeline.load_lora_into_unet(state, alphas, loaded)
    assert_loaded(loaded, lora)
    model.eval()
    torch.testing.assert_close(run(loaded, inputs), run(model, inputs), atol=1e-5, rtol=0)
    assert_deltas(
        read_lora(tmp_path / "k.safetensors", [n for n, _ in unet.named_modules()]),
        peft_deltas(model),
    )
