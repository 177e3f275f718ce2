"""More single-file layouts, read into the one form and checked against diffusers' own loaders.

Files are made the way the older tools wrote them: diffusers' attention-processor keys,
kohya's LDM (SGM) module names, ComfyUI's `diffusion_model.` prefix, text-encoder parts.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from condlora.cli import main
from condlora.core.errors import LoRAError
from condlora.lora.formats import read_lora
from condlora.lora.formats.keys import ldm_table
from condlora.lora.formats.kohya import kohya_stem

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


def clip_module(model, path):
    """A CLIP layer by its file path (text_model.encoder...); transformers 5 dropped the
    text_model level from the module tree."""
    modules = dict(model.named_modules())
    return modules.get(path) or modules[path.removeprefix("text_model.")]


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


def tiny_sd2_unet():
    """SD 2.x's U-Net form: linear proj_in / proj_out, a head width per block."""
    return tiny_unet2d_condition(attention_head_dim=(2, 4), use_linear_projection=True)


UNETS = {"sd1": tiny_unet2d_condition, "sd2": tiny_sd2_unet, "sdxl": tiny_sdxl_unet}


@pytest.mark.parametrize("make", UNETS.values(), ids=UNETS.keys())
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


def test_old_diffusers_alpha_keys_read_as_diffusers_converts_them(unet, inputs, tmp_path):
    # diffusers < 0.25 keyed a module's alpha after its down factor (network_alphas):
    # <attn>.processor.to_q_lora.down.weight.alpha, <module>.lora.down.weight.alpha
    parts = factors(unet, TARGETS, seed=5)
    alphas = {name: float(i + 2) for i, name in enumerate(parts)}  # one alpha per module
    state, alpha_keys = {}, {}
    for name, (A, B) in parts.items():
        state |= {old_diffusers_key(name, "down"): A, old_diffusers_key(name, "up"): B}
        alpha_keys[old_diffusers_key(name, "down") + ".alpha"] = torch.tensor(alphas[name])
    assert f"unet.{ATTN}.attn1.processor.to_q_lora.down.weight.alpha" in alpha_keys
    save_file(state | alpha_keys, tmp_path / "old.safetensors")
    lora = read_lora(tmp_path / "old.safetensors")
    assert lora.unmapped == {}
    for name, m in lora.modules.items():
        assert m.scale == alphas[name] / m.rank, name
    # diffusers' own conversion: its key map turns the alpha keys into network alphas
    # (unet.<module>.lora_A.weight.alpha), which its loader applies per module
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    network_alphas = {k: float(v) for k, v in convert_unet_state_dict_to_peft(alpha_keys).items()}
    model = copy.deepcopy(unet)
    Pipeline.load_lora_into_unet(state, network_alphas, model)
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


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_kohya_ldm_names_map_through_the_base_model(family, inputs, tmp_path):
    unet = UNETS[family]()
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


def modules_file(unet, tmp_path):
    """The U-Net's module names as a --base-modules JSON list."""
    path = tmp_path / "modules.json"
    path.write_text(json.dumps([name for name, _ in unet.named_modules() if name]))
    return path


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
    # LDM names without the base model: never written as module names that do not exist
    args = ["lora", "convert", str(tmp_path / "ldm.safetensors"), "--to", "peft", "--out"]
    assert main([*args, str(tmp_path / "p")]) == 2 and not (tmp_path / "p").exists()
    assert (
        main([*args, str(tmp_path / "p"), "--base-modules", str(modules_file(unet, tmp_path))]) == 0
    )
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(parts)  # the U-Net's own module paths


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
