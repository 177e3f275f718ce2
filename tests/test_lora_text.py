"""Text-encoder parts of LoRA files (kohya lora_te_ / lora_te1_ / lora_te2_, diffusers
text_encoder., older diffusers keys, ComfyUI text_encoders.) read, kept and written, checked
against diffusers' own savers and loaders on a tiny CLIP text model."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from condlora.cli import main
from condlora.lora.formats import read_lora, write_lora
from condlora.lora.formats.kohya import kohya_stem

from .test_lora_layouts import TARGETS, Pipeline, assert_deltas, clip_module, factors

transformers = pytest.importorskip("transformers")

TEXT_TARGETS = {"self_attn.q_proj": 2, "self_attn.out_proj": 1, "mlp.fc1": 2}


@pytest.fixture(scope="module")
def unet():
    from .conftest import tiny_unet2d_condition

    return tiny_unet2d_condition()


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=50,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=2,
    )
    return CLIPTextModel(config).eval()


def clip_parts(clip, seed=4):
    layers = ("text_model.encoder.layers.0", "text_model.encoder.layers.1")
    targets = {f"{layer}.{m}": r for m, r in TEXT_TARGETS.items() for layer in layers}
    return factors(clip, targets, seed)


def encode(model):
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 7, 2]])).last_hidden_state


def test_kohya_text_encoder_modules_are_read_and_load_in_diffusers(clip, tmp_path):
    parts = clip_parts(clip)
    tensors = {}
    for path, (A, B) in parts.items():
        stem = "lora_te_" + kohya_stem(path)
        tensors |= {f"{stem}.lora_down.weight": A, f"{stem}.lora_up.weight": B}
        tensors[f"{stem}.alpha"] = torch.tensor(2.0)
    save_file(tensors, tmp_path / "te.safetensors")
    lora = read_lora(tmp_path / "te.safetensors")
    assert lora.modules == {} and lora.unmapped == {}
    prefixed = {f"text_encoder.{p}": ab for p, ab in parts.items()}
    assert_deltas(lora.text_encoder, prefixed, alpha=2)
    # the reference: diffusers' own kohya conversion and text-encoder loader
    state, alphas = Pipeline.lora_state_dict(tmp_path / "te.safetensors")
    model = copy.deepcopy(clip)
    Pipeline.load_lora_into_text_encoder(state, alphas, model, prefix="text_encoder")
    by_hand = copy.deepcopy(clip)
    with torch.no_grad():
        for name, m in lora.text_encoder.items():
            clip_module(by_hand, name.removeprefix("text_encoder.")).weight += m.delta()
    torch.testing.assert_close(encode(model), encode(by_hand))
    # what condlora writes (diffusers, kohya) loads through the same loader, every module
    for layout in ("diffusers", "kohya"):
        write_lora(lora, tmp_path / f"{layout}.safetensors", layout)
        state, alphas = Pipeline.lora_state_dict(tmp_path / f"{layout}.safetensors")
        model = copy.deepcopy(clip)
        Pipeline.load_lora_into_text_encoder(state, alphas, model, prefix="text_encoder")
        assert len(lora_layers(model)) == len(lora.text_encoder), layout
        torch.testing.assert_close(encode(model), encode(by_hand))


def test_text_encoders_survive_kohya_diffusers_round_trips(clip, unet, tmp_path):
    te, te2 = clip_parts(clip, 5), clip_parts(clip, 6)
    tensors = {}
    for prefix, parts in (("lora_te1_", te), ("lora_te2_", te2)):
        for path, (A, B) in parts.items():
            stem = prefix + kohya_stem(path)
            tensors |= {f"{stem}.lora_down.weight": A, f"{stem}.lora_up.weight": B}
            tensors[f"{stem}.alpha"] = torch.tensor(3.0)
    for name, (A, B) in factors(unet, TARGETS).items():
        stem = "lora_unet_" + kohya_stem(name)
        tensors |= {f"{stem}.lora_down.weight": A, f"{stem}.lora_up.weight": B}
    save_file(tensors, tmp_path / "xl.safetensors")
    base = [name for name, _ in unet.named_modules() if name]
    lora = read_lora(tmp_path / "xl.safetensors", base)
    expected = {f"text_encoder.{p}": ab for p, ab in te.items()}
    expected |= {f"text_encoder_2.{p}": ab for p, ab in te2.items()}
    assert_deltas(lora.text_encoder, expected, alpha=3)
    write_lora(lora, tmp_path / "d.safetensors", "diffusers")
    again = read_lora(tmp_path / "d.safetensors")
    write_lora(again, tmp_path / "k.safetensors", "kohya")
    last = read_lora(tmp_path / "k.safetensors", base)
    for weights in (again, last):
        assert weights.unmapped == {}
        assert_deltas(weights.text_encoder, expected, alpha=3)
        assert_deltas(weights.modules, factors(unet, TARGETS))
    written = read_lora(tmp_path / "k.safetensors").text_encoder
    assert sorted(written) == sorted(expected)
    out = tmp_path / "r1.safetensors"
    assert (
        main(
            [
                "lora",
                "convert",
                str(tmp_path / "k.safetensors"),
                "--to",
                "kohya",
                "--out",
                str(out),
                "--rank",
                "1",
            ]
        )
        == 0
    )
    assert {m.rank for m in read_lora(out).text_encoder.values()} == {1}  # text encoders too


def test_old_diffusers_text_encoder_keys(clip, tmp_path):
    parts = clip_parts(clip, 7)
    tensors = {}
    for path, (A, B) in parts.items():
        # diffusers < 0.25: attention under to_q_lora ..., MLP under lora_linear_layer
        layer, _, proj = path.rpartition(".")
        old = {"q_proj": "to_q_lora", "out_proj": "to_out_lora"}.get(proj)
        stem = f"text_encoder.{layer}.{old}" if old else f"text_encoder.{path}.lora_linear_layer"
        tensors |= {f"{stem}.down.weight": A, f"{stem}.up.weight": B}
        # and its alpha keyed after the down factor, as diffusers' network_alphas were
        tensors[f"{stem}.down.weight.alpha"] = torch.tensor(3.0)
    layer0 = "text_encoder.text_model.encoder.layers.0"
    assert f"{layer0}.self_attn.to_q_lora.down.weight.alpha" in tensors
    save_file(tensors, tmp_path / "old.safetensors")
    lora = read_lora(tmp_path / "old.safetensors")
    assert lora.unmapped == {}
    expected = {f"text_encoder.{p}": ab for p, ab in parts.items()}
    assert_deltas(lora.text_encoder, expected, alpha=3)
    # diffusers' own loader, given the factors and those alphas as its network_alphas
    state = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    alphas = {k: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    loaded = copy.deepcopy(clip)
    Pipeline.load_lora_into_text_encoder(state, alphas, loaded, prefix="text_encoder")
    by_hand = copy.deepcopy(clip)
    with torch.no_grad():
        for name, m in lora.text_encoder.items():
            weight = clip_module(by_hand, name.removeprefix("text_encoder.")).weight
            weight += m.delta().reshape(weight.shape)
    torch.testing.assert_close(encode(loaded), encode(by_hand))


def test_comfyui_text_encoder_prefixes(clip, tmp_path):
    parts = clip_parts(clip, 8)
    tensors = {}
    for prefix in ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer."):
        for path, (A, B) in parts.items():
            stem = prefix + path
            tensors |= {f"{stem}.lora_down.weight": A.clone(), f"{stem}.lora_up.weight": B.clone()}
    save_file(tensors, tmp_path / "c.safetensors")
    lora = read_lora(tmp_path / "c.safetensors")
    expected = {f"text_encoder.{p}": ab for p, ab in parts.items()}
    expected |= {f"text_encoder_2.{p}": ab for p, ab in parts.items()}
    assert lora.layout == "comfyui" and lora.unmapped == {}
    assert_deltas(lora.text_encoder, expected)


def randomised_peft_deltas(model, seed):
    """Random LoRA factors in a peft-injected CLIP model; peft's own dW of each layer, named
    by its CLIPTextModel path as the files name text-encoder layers."""
    from peft.tuners.lora import LoraLayer

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    expected = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            path = name.removeprefix("base_model.model.")
            path = path if path.startswith("text_model.") else f"text_model.{path}"
            expected[f"text_encoder.{path}"] = layer.get_delta_weight("default")
    return expected


def test_text_encoder_files_from_diffusers_saver_keep_their_scale(clip, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    model = inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "fc1"]), copy.deepcopy(clip)
    )
    expected = randomised_peft_deltas(model, seed=12)
    Pipeline.save_lora_weights(
        tmp_path / "d",
        unet_lora_layers=None,
        text_encoder_lora_layers=get_peft_model_state_dict(model),
        text_encoder_lora_adapter_metadata={"r": 2, "lora_alpha": 6},
    )
    assert main(["lora", "info", "--strict", str(tmp_path / "d")]) == 0  # every key read
    lora = read_lora(tmp_path / "d")
    assert lora.unmapped == {} and {m.scale for m in lora.text_encoder.values()} == {3.0}
    write_lora(lora, tmp_path / "k.safetensors", "kohya")  # kohya's CLIP stems map back
    write_lora(lora, tmp_path / "again.safetensors", "diffusers")
    again = read_lora(tmp_path / "again.safetensors")
    for weights in (lora, read_lora(tmp_path / "k.safetensors"), again):
        assert sorted(weights.text_encoder) == sorted(expected)
        for name, want in expected.items():
            err = (weights.text_encoder[name].delta() - want).norm() / want.norm()
            assert err < 1e-6, name


def test_a_peft_adapter_of_a_clip_text_model_is_read_as_a_text_encoder(clip, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(clip), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    expected = randomised_peft_deltas(model, seed=5)
    model.save_pretrained(tmp_path / "peft")
    assert main(["lora", "info", "--strict", str(tmp_path / "peft")]) == 0  # every key read
    lora = read_lora(tmp_path / "peft")
    assert lora.modules == {} and sorted(lora.text_encoder) == sorted(expected)  # not U-Net
    for name, want in expected.items():
        err = (lora.text_encoder[name].delta() - want).norm() / want.norm()
        assert err < 1e-6, name
    write_lora(lora, tmp_path / "k.safetensors", "kohya")  # kohya names them lora_te_ ...
    assert all(k.startswith("lora_te_") for k in load_file(tmp_path / "k.safetensors"))
    assert sorted(read_lora(tmp_path / "k.safetensors").text_encoder) == sorted(expected)


def lora_layers(model):
    """The LoRA layers that peft injected into a model."""
    from peft.tuners.lora import LoraLayer

    return [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def test_peft_folders_per_component_as_peft_dreambooth_saves_and_loads_them(
    clip, unet, tmp_path, capsys
):
    from peft import LoraConfig, PeftModel, get_peft_model

    # peft's DreamBooth example: one adapter per model, in unet/ and text_encoder/
    text_model = get_peft_model(
        copy.deepcopy(clip), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "fc1"])
    )
    expected = randomised_peft_deltas(text_model, seed=13)
    unet_model = get_peft_model(
        copy.deepcopy(unet), LoraConfig(r=1, lora_alpha=3, target_modules=["to_q", "conv1"])
    )
    randomised_peft_deltas(unet_model, seed=14)
    text_model.save_pretrained(tmp_path / "db" / "text_encoder")
    unet_model.save_pretrained(tmp_path / "db" / "unet")
    assert main(["lora", "info", "--strict", str(tmp_path / "db")]) == 0
    assert "unmapped keys: 0" in capsys.readouterr().out
    lora = read_lora(tmp_path / "db")
    assert sorted(lora.modules) == sorted(
        n.removeprefix("base_model.model.") for n in lora_layers(unet_model)
    )
    for name, want in expected.items():
        err = (lora.text_encoder[name].delta() - want).norm() / want.norm()
        assert err < 1e-6, name

    # condlora writes them the same way (from a kohya file here), and peft loads each
    # adapter with every module of the file in its model and the source's outputs
    write_lora(lora, tmp_path / "k.safetensors", "kohya")
    names = tmp_path / "modules.json"
    names.write_text(json.dumps([n for n, _ in unet.named_modules() if n]))
    args = ["lora", "convert", str(tmp_path / "k.safetensors"), "--to", "peft"]
    assert main([*args, "--out", str(tmp_path / "out"), "--base-modules", str(names)]) == 0
    assert "peft adapters: text_encoder, unet" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["text_encoder", "unet"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(clip), tmp_path / "out" / "text_encoder")
    assert len(lora_layers(loaded)) == len(lora.text_encoder)
    torch.testing.assert_close(encode(loaded.eval()), encode(text_model.eval()))
    loaded = PeftModel.from_pretrained(copy.deepcopy(unet), tmp_path / "out" / "unet")
    assert len(lora_layers(loaded)) == len(lora.modules)
    g = torch.Generator().manual_seed(3)
    args = torch.randn(1, 4, 8, 8, generator=g), 10, torch.randn(1, 3, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args).sample, unet_model(*args).sample)
    again = read_lora(tmp_path / "out")
    assert sorted(again.text_encoder) == sorted(expected) and again.unmapped == {}


LYCORIS_ALGOS = {"lora": {}, "loha": {}, "lokr": {"factor": 2}}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("algo", sorted(LYCORIS_ALGOS))
def test_lycoris_networks_on_a_clip_text_encoder(clip, algo, tmp_path, capsys):
    lycoris = pytest.importorskip("lycoris")
    from peft import PeftModel

    model = copy.deepcopy(clip)
    args = dict(linear_dim=2, linear_alpha=1.0, algo=algo) | LYCORIS_ALGOS[algo]
    network = lycoris.create_lycoris(model, 1.0, **args)
    network.apply_to()
    g = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    path = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(path), torch.float32, None)
    reference = encode(model)
    assert main(["lora", "info", "--strict", str(path)]) == 0
    assert "unmapped keys: 0" in capsys.readouterr().out
    lora = read_lora(path, other_kinds=True)  # lycoris_encoder_layers_0_... : CLIP layers
    every = {**lora.text_encoder, **lora.others}
    assert lora.modules == {} and len(every) == 12  # 2 layers x q, k, v, out, fc1, fc2
    by_hand = copy.deepcopy(clip)
    with torch.no_grad():
        for name, m in every.items():
            weight = clip_module(by_hand, name.removeprefix("text_encoder.")).weight
            weight += m.delta().reshape(weight.shape)
    torch.testing.assert_close(encode(by_hand), reference)
    # condlora's peft output (LoHa / LoKr by SVD at their numerical rank) loads through
    # peft with every module and gives the lycoris network's outputs
    assert main(["lora", "convert", str(path), "--to", "peft", "--out", str(tmp_path / "p")]) == 0
    loaded = PeftModel.from_pretrained(copy.deepcopy(clip), tmp_path / "p" / "text_encoder")
    assert len(lora_layers(loaded)) == len(every)
    torch.testing.assert_close(encode(loaded.eval()), reference, atol=1e-5, rtol=1e-4)
