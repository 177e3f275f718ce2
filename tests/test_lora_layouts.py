"""More single-file layouts, read into the one form and checked against diffusers' own loaders.

Files are made the way the older tools wrote them: diffusers' attention-processor keys,
kohya's LDM (SGM) module names, ComfyUI's `diffusion_model.` prefix, text-encoder parts.
"""

import copy

import pytest
import torch
from safetensors.torch import save_file

from condlora.cli import main
from condlora.core.errors import LoRAError
from condlora.lora.formats import read_lora, write_lora
from condlora.lora.formats.kohya import kohya_stem
from condlora.lora.formats.names import ldm_table

from .conftest import merged_by_hand, tiny_unet2d_condition

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers.loaders import StableDiffusionLoraLoaderMixin as Pipeline  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    LDM_UNET_KEY,
    convert_ldm_unet_checkpoint,
)

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
UP_ATTN = "up_blocks.1.attentions.0.transformer_blocks.0"
# module -> rank; attention projections, a resnet conv, a 1x1 conv shortcut, time projection
TARGETS = {
    f"{ATTN}.attn1.to_q": 1,
    f"{ATTN}.attn2.to_k": 2,
    f"{ATTN}.attn1.to_out.0": 1,
    f"{UP_ATTN}.attn2.to_v": 2,
    "down_blocks.0.attentions.0.proj_in": 2,
    "down_blocks.1.resnets.0.conv1": 1,
    "up_blocks.1.resnets.0.conv_shortcut": 2,
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_k": 1,
}
TEXT_TARGETS = {"self_attn.q_proj": 2, "self_attn.out_proj": 1, "mlp.fc1": 2}


@pytest.fixture(scope="module")
def unet():
    return tiny_unet2d_condition()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    return sample, torch.tensor([10, 500]), text


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


def factors(model, targets, seed=0):
    """name -> (A, B) of the right shapes for the model's modules."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, rank in targets.items():
        w = clip_module(model, name).weight
        conv = w.dim() == 4
        A = 0.2 * torch.randn((rank, *w.shape[1:]) if conv else (rank, w.shape[1]), generator=g)
        B = 0.2 * torch.randn((w.shape[0], rank, 1, 1) if conv else (w.shape[0], rank), generator=g)
        out[name] = (A, B)
    return out


def assert_deltas(lora, expected, alpha=None):
    """Each module's dW is (alpha / r) B A, or B A when the file has no alpha."""
    assert sorted(lora) == sorted(expected)
    for name, (A, B) in expected.items():
        a, b = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
        scale = 1.0 if alpha is None else alpha / A.shape[0]
        want = (scale * (b @ a)).reshape(lora[name].delta_shape)
        err = (lora[name].delta() - want).norm() / want.norm()
        assert err < 1e-6, (name, float(err))


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        layers_per_block=2,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
        transformer_layers_per_block=(1, 2, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=24,
    )


@pytest.mark.parametrize("make", [tiny_unet2d_condition, tiny_sdxl_unet], ids=["sd1", "sdxl"])
def test_ldm_names_agree_with_diffusers_checkpoint_converter(make):
    unet = make()
    table = ldm_table(name for name, _ in unet.named_modules() if name)
    state = unet.state_dict()
    ldm = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        ldm[f"{LDM_UNET_KEY}{table[module]}.{param}"] = value
    # diffusers' own LDM -> diffusers checkpoint conversion gives every weight its name back
    back = convert_ldm_unet_checkpoint(ldm, unet.config)
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def old_diffusers_key(name, role):
    """How diffusers 0.1x - 0.2x wrote a U-Net LoRA key (attention-processor form)."""
    attn, _, proj = name.rpartition(".")
    if proj == "0" and attn.endswith(".to_out"):
        return f"unet.{attn[: -len('.to_out')]}.processor.to_out_lora.{role}.weight"
    if proj in ("to_q", "to_k", "to_v"):
        return f"unet.{attn}.processor.{proj}_lora.{role}.weight"
    return f"unet.{name}.lora.{role}.weight"


def test_old_diffusers_keys_read_as_diffusers_loads_them(unet, inputs, tmp_path):
    parts = factors(unet, TARGETS)
    tensors = {}
    for name, (A, B) in parts.items():
        tensors[old_diffusers_key(name, "down")] = A
        tensors[old_diffusers_key(name, "up")] = B
    assert f"unet.{ATTN}.attn1.processor.to_out_lora.up.weight" in tensors
    save_file(tensors, tmp_path / "old.safetensors")
    lora = read_lora(tmp_path / "old.safetensors")
    assert lora.unmapped == {} and lora.layout == "diffusers"
    assert_deltas(lora.modules, parts)
    state, alphas = Pipeline.lora_state_dict(tmp_path / "old.safetensors")
    model = copy.deepcopy(unet)
    Pipeline.load_lora_into_unet(state, alphas, model)
    torch.testing.assert_close(run(model, inputs), run(merged_by_hand(unet, lora), inputs))


def ldm_kohya_file(unet, parts, alpha, path):
    """A kohya file as sd-scripts writes SDXL: U-Net modules under their LDM names."""
    table = ldm_table(name for name, _ in unet.named_modules() if name)
    tensors = {}
    for name, (A, B) in parts.items():
        stem = "lora_unet_" + kohya_stem(table[name])
        tensors |= {f"{stem}.lora_down.weight": A, f"{stem}.lora_up.weight": B}
        tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, path)
    return tensors


def test_kohya_ldm_names_map_through_the_base_model(unet, inputs, tmp_path):
    parts = factors(unet, TARGETS, seed=2)
    tensors = ldm_kohya_file(unet, parts, 4, tmp_path / "k.safetensors")
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha" in tensors
    assert "lora_unet_input_blocks_3_0_in_layers_2.lora_down.weight" in tensors
    assert "lora_unet_output_blocks_2_0_skip_connection.alpha" in tensors
    base = [name for name, _ in unet.named_modules() if name]
    lora = read_lora(tmp_path / "k.safetensors", base)
    assert lora.resolved and lora.unmapped == {}
    assert_deltas(lora.modules, parts, alpha=4)
    # diffusers' own SGM -> diffusers mapping, given the U-Net's config, loads the same dW
    state, alphas = Pipeline.lora_state_dict(tmp_path / "k.safetensors", unet_config=unet.config)
    model = copy.deepcopy(unet)
    Pipeline.load_lora_into_unet(state, alphas, model)
    torch.testing.assert_close(run(model, inputs), run(merged_by_hand(unet, lora), inputs))
    # without the module list the names stay kohya stems
    assert not read_lora(tmp_path / "k.safetensors").resolved


def test_comfyui_prefix_with_ldm_or_diffusers_paths(unet, tmp_path):
    parts = factors(unet, TARGETS, seed=3)
    table = ldm_table(name for name, _ in unet.named_modules() if name)
    base = [name for name, _ in unet.named_modules() if name]
    for label, naming in (("ldm", table.get), ("diffusers", lambda n: n)):
        tensors = {}
        for name, (A, B) in parts.items():
            stem = f"diffusion_model.{naming(name)}"
            tensors |= {f"{stem}.lora_down.weight": A, f"{stem}.lora_up.weight": B}
            tensors[f"{stem}.alpha"] = torch.tensor(3.0)
        save_file(tensors, tmp_path / f"{label}.safetensors")
        lora = read_lora(tmp_path / f"{label}.safetensors", base)
        assert lora.layout == "comfyui" and lora.resolved and lora.unmapped == {}, label
        assert_deltas(lora.modules, parts, alpha=3)


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


def clip_module(clip, path):
    """A CLIP layer by its file path (text_model.encoder...); transformers 5 dropped the
    text_model level from the module tree."""
    modules = dict(clip.named_modules())
    return modules.get(path) or modules[path.removeprefix("text_model.")]


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
    save_file(tensors, tmp_path / "old.safetensors")
    lora = read_lora(tmp_path / "old.safetensors")
    assert lora.unmapped == {}
    assert_deltas(lora.text_encoder, {f"text_encoder.{p}": ab for p, ab in parts.items()})


def test_info_lists_unmapped_keys_and_strict_refuses(tmp_path, capsys):
    stem = "lora_unet_mid_block_attentions_0_proj_in"
    tensors = {
        f"{stem}.lora_down.weight": torch.ones(2, 8),
        f"{stem}.lora_up.weight": torch.ones(8, 2),
        f"{stem}.lora_embedding_A": torch.ones(8, 1),
        "lora_te_something_odd.lora_down.weight": torch.ones(2, 8),
        "lora_te_something_odd.lora_up.weight": torch.ones(8, 2),
        "stray": torch.ones(3),
    }
    path = tmp_path / "k.safetensors"
    save_file(tensors, path)
    assert main(["lora", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "unmapped keys: 4" in out
    assert f"unmapped: {stem}.lora_embedding_A: embedding LoRA: not read" in out
    assert "unmapped: stray: no known LoRA key pattern" in out
    assert "unmapped: lora_te_something_odd.lora_up.weight: text_encoder module" in out
    assert main(["lora", "info", "--strict", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("condlora: error: --strict: key ") and err.count("\n") == 1
    assert "and 3 more" in err
    out_file = tmp_path / "out.safetensors"
    args = ["lora", "convert", str(path), "--to", "kohya", "--out", str(out_file)]
    assert main(args) == 2 and not out_file.exists()
    assert "--drop-unmapped" in capsys.readouterr().err
    assert main([*args, "--drop-unmapped"]) == 0
    assert "not written: stray" in capsys.readouterr().out
    assert sorted(read_lora(out_file).modules) == ["mid_block_attentions_0_proj_in"]
    with pytest.raises(LoRAError, match=r"lora_embedding_A' maps to no module: .* \(and 3 more\)"):
        read_lora(path)  # library callers never get a LoRA with keys left out


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


def test_base_modules_from_a_unet_config_json(unet, tmp_path):
    import json

    from condlora.lora.formats import load_base_modules

    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(unet.config)))
    modules = load_base_modules(path)
    assert modules == {
        n: tuple(m.weight.shape) if hasattr(m, "weight") and m.weight is not None else None
        for n, m in unet.named_modules()
        if n
    }
    parts = factors(unet, TARGETS, seed=9)
    ldm_kohya_file(unet, parts, 4, tmp_path / "k.safetensors")
    assert_deltas(read_lora(tmp_path / "k.safetensors", modules).modules, parts, alpha=4)


SDXL_TARGETS = {
    "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": 2,
    "up_blocks.0.attentions.2.proj_out": 1,
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2": 2,
    "down_blocks.0.resnets.1.conv2": 1,
    "down_blocks.1.resnets.0.conv_shortcut": 2,
    "add_embedding.linear_1": 1,
    "up_blocks.1.resnets.2.time_emb_proj": 2,
}


def test_sdxl_kohya_ldm_names_load_like_diffusers_loads_them(tmp_path):
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as XL

    unet = tiny_sdxl_unet().eval()
    parts = factors(unet, SDXL_TARGETS, seed=11)
    tensors = ldm_kohya_file(unet, parts, 2, tmp_path / "xl.safetensors")
    assert "lora_unet_label_emb_0_0.alpha" in tensors
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.alpha" in tensors
    base = [name for name, _ in unet.named_modules() if name]
    lora = read_lora(tmp_path / "xl.safetensors", base)
    assert lora.unmapped == {}
    assert_deltas(lora.modules, parts, alpha=2)
    state, alphas = XL.lora_state_dict(tmp_path / "xl.safetensors", unet_config=unet.config)
    model = copy.deepcopy(unet)
    XL.load_lora_into_unet(state, alphas, model)
    g = torch.Generator().manual_seed(2)
    sample, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    added = {
        "text_embeds": torch.randn(1, 8, generator=g),
        "time_ids": torch.randn(1, 4, generator=g),
    }
    with torch.no_grad():
        got = model(sample, 10, text, added_cond_kwargs=added).sample
        want = merged_by_hand(unet, lora)(sample, 10, text, added_cond_kwargs=added).sample
    torch.testing.assert_close(got, want)


def test_text_encoder_files_from_diffusers_saver_keep_their_scale(clip, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    model = inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "fc1"]), copy.deepcopy(clip)
    )
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    expected = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):  # peft's own dW, named as the files name CLIP layers
            path = name if name.startswith("text_model.") else f"text_model.{name}"
            expected[f"text_encoder.{path}"] = layer.get_delta_weight("default")
    Pipeline.save_lora_weights(
        tmp_path / "d",
        unet_lora_layers=None,
        text_encoder_lora_layers=get_peft_model_state_dict(model),
        text_encoder_lora_adapter_metadata={"r": 2, "lora_alpha": 6},
    )
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
