"""LoRA files in peft / diffusers / kohya layouts: scale kept, names mapped, bad input refused."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from condlora.cli import main
from condlora.core.errors import LoRAError
from condlora.lora.formats import (
    BaseMismatch,
    LoRAWeights,
    detect_layout,
    load_base_modules,
    make_module,
    read_lora,
    write_lora,
)
from condlora.lora.formats.peft import config_scales, from_peft, to_peft
from condlora.lora.formats.single import from_diffusers, from_kohya

# name -> (out, in, kernel or None, rank, alpha): weights2weights' r = 1, alpha = 27 and more
MODULES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8, None, 1, 27),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (8, 8, None, 1, 27),
    "down_blocks.0.attentions.0.proj_in": (8, 8, None, 4, 27),
    "down_blocks.0.resnets.0.conv1": (8, 4, 3, 1, 27),
    "mid_block.resnets.0.time_emb_proj": (16, 32, None, 2, 5),
}
BASE = {name: (o, i, k, k) if k else (o, i) for name, (o, i, k, _, _) in MODULES.items()}


def make_lora(seed=0, modules=MODULES):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i, k, r, alpha) in modules.items():
        A = torch.randn((r, i, k, k) if k else (r, i), generator=g)
        B = torch.randn((o, r, 1, 1) if k else (o, r), generator=g)
        out[name] = make_module(name, A, B, alpha / r, "test")
    return LoRAWeights(out)


def assert_same_deltas(got, expected, rel=1e-6):
    assert sorted(got.modules) == sorted(expected.modules)
    for name, module in expected.modules.items():
        want = module.delta()
        err = (got.modules[name].delta() - want).norm() / want.norm()
        assert err < rel, (name, float(err))


def test_module_lora_delta_and_its_norm():
    for name, module in make_lora(1).modules.items():
        a, b = module.A.reshape(module.rank, -1), module.B.reshape(-1, module.rank)
        plain = module.scale * (b @ a)  # reference: dW by hand on the flattened kernels
        assert torch.equal(module.delta(), plain.reshape(module.delta_shape))
        assert module.delta_norm() == pytest.approx(float(plain.norm()), rel=1e-5), name
        assert torch.allclose(module.folded().delta(), module.delta(), rtol=1e-6, atol=1e-6)


def test_round_trip_peft_diffusers_kohya_peft_keeps_alpha(tmp_path):
    original = make_lora()
    write_lora(original, tmp_path / "a", "peft")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (1, 27)  # never alpha = r
    assert config["rank_pattern"] == {
        r"^down_blocks\.0\.attentions\.0\.proj_in": 4,
        r"^mid_block\.resnets\.0\.time_emb_proj": 2,
    }
    assert config["alpha_pattern"] == {r"^mid_block\.resnets\.0\.time_emb_proj": 5}
    peft = read_lora(tmp_path / "a")
    assert peft.layout == "peft"
    assert_same_deltas(peft, original)

    write_lora(peft, tmp_path / "b", "diffusers")
    diffusers = read_lora(tmp_path / "b")
    assert diffusers.layout == "diffusers"
    assert_same_deltas(diffusers, original)

    write_lora(diffusers, tmp_path / "c.safetensors", "kohya")
    raw = load_file(tmp_path / "c.safetensors")
    assert float(raw["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 27.0
    assert raw["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (1, 4, 3, 3)
    # one alpha per file: alpha 5 becomes 27, the factor 5/27 split as sqrt into down and up
    stem, source = (
        "lora_unet_mid_block_resnets_0_time_emb_proj",
        original.modules["mid_block.resnets.0.time_emb_proj"],
    )
    assert float(raw[f"{stem}.alpha"]) == 27.0
    root = (5 / 27) ** 0.5
    torch.testing.assert_close(raw[f"{stem}.lora_down.weight"], root * source.A)
    torch.testing.assert_close(raw[f"{stem}.lora_up.weight"], root * source.B)
    kohya = read_lora(tmp_path / "c.safetensors", base_modules=list(BASE))
    assert kohya.layout == "kohya" and kohya.resolved
    assert_same_deltas(kohya, original)

    write_lora(kohya, tmp_path / "d", "peft")
    assert_same_deltas(read_lora(tmp_path / "d"), original)
    assert json.loads((tmp_path / "d" / "adapter_config.json").read_text())["lora_alpha"] == 27


def test_peft_config_scales_follow_peft_rules():
    ranks = {"x.attn1.to_q": 4, "x.attn1.to_qq": 8, "y.conv1": 2}
    config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"to_q": 4, "conv1": 2}}
    # peft's rule: a pattern matches a suffix of the module path at a dot boundary
    assert config_scales(config, ranks, "t") == {
        "x.attn1.to_q": 16 / 4,
        "x.attn1.to_qq": 16 / 8,
        "y.conv1": 16 / 2,
    }
    config["alpha_pattern"] = {r"^y\.conv1": 3}
    config["use_rslora"] = True
    scales = config_scales(config, ranks, "t")
    assert scales["y.conv1"] == pytest.approx(3 / 2**0.5)
    assert scales["x.attn1.to_q"] == pytest.approx(16 / 2)
    with pytest.raises(LoRAError, match="rank 8 but its factors have rank 4"):
        config_scales({"r": 8}, {"x.attn1.to_q": 4}, "t")


def test_dict_layouts_read_their_scales():
    A, B = torch.randn(2, 3), torch.randn(4, 2)
    # diffusers: no alpha anywhere means scale 1; an .alpha entry means alpha / r
    plain = from_diffusers({"unet.m.lora_A.weight": A, "unet.m.lora_B.weight": B}, {}, "t")
    assert plain.modules["m"].scale == 1.0
    tensors = {"m.lora_A.weight": A, "m.lora_B.weight": B, "m.alpha": torch.tensor(27.0)}
    assert from_diffusers(tensors, {}, "t").modules["m"].scale == 13.5
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 3})}
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    with_te = {"unet.m.lora_A.weight": A, "unet.m.lora_B.weight": B, "text_encoder.x": A}
    with_te |= {f"{te}.lora_A.weight": A, f"{te}.lora_B.weight": B}
    read = from_diffusers(with_te, meta, "t")
    assert read.modules["m"].scale == 1.5 and list(read.text_encoder) == [te]
    assert read.text_encoder[te].scale == 1.0  # the metadata is the U-Net's
    assert read.unmapped == {"text_encoder.x": "no known LoRA key pattern"}
    # kohya: no alpha means alpha = r
    kohya = {"lora_unet_m_a.lora_down.weight": A, "lora_unet_m_a.lora_up.weight": B}
    assert from_kohya(kohya, {}, ["m.a"], "t").modules["m.a"].scale == 1.0
    # peft dict functions are inverses
    weights = make_lora(3)
    tensors, config = to_peft(weights)
    assert_same_deltas(from_peft(tensors, config, "t"), weights)


def test_kohya_names_come_from_the_base_module_list():
    A, B = torch.randn(1, 3), torch.randn(4, 1)
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": A,
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": B,
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(27.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": A,
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": B,
    }
    # a naive "_" -> "." guess would give down.blocks.0.attentions.0.proj.in
    base = ["down_blocks", "down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0"]
    weights = from_kohya(tensors, {}, base, "t")
    assert list(weights.modules) == ["down_blocks.0.attentions.0.proj_in"]
    assert weights.modules["down_blocks.0.attentions.0.proj_in"].scale == 27.0
    assert list(weights.text_encoder) == ["text_encoder.text_model.encoder.layers.0.mlp.fc1"]
    unresolved = from_kohya(tensors, {}, None, "t")
    assert not unresolved.resolved
    with pytest.raises(LoRAError, match="--base-modules"):
        to_peft(unresolved)
    with pytest.raises(BaseMismatch, match="not in the base model"):
        from_kohya(tensors, {}, ["other.module"], "t")
    with pytest.raises(LoRAError, match="ambiguous"):
        from_kohya(tensors, {}, [*base, "down_blocks.0.attentions_0.proj_in"], "t")


def test_base_model_shapes_are_checked(tmp_path):
    write_lora(make_lora(), tmp_path / "a", "peft")
    read_lora(tmp_path / "a", BASE)
    other = {**BASE, "down_blocks.0.resnets.0.conv1": (8, 6, 3, 3)}
    with pytest.raises(BaseMismatch, match="another base model"):
        read_lora(tmp_path / "a", other)
    path = tmp_path / "base.json"
    path.write_text(json.dumps({k: list(v) for k, v in BASE.items()}))
    assert load_base_modules(path) == BASE
    path = tmp_path / "base.txt"
    path.write_text("# modules\n" + "\n".join(BASE) + "\n")
    assert load_base_modules(path) == dict.fromkeys(BASE)
    path = tmp_path / "model.safetensors"
    save_file({f"{k}.weight": torch.zeros(v) for k, v in BASE.items()}, path)
    assert load_base_modules(path) == BASE


def tiny_condlora_run(folder):
    """A condlora run folder (EMA file and checkpoint, as training writes them) of a tiny
    ClassLoRA + TimeLoRA digits net, and its backbone (denoiser.net.net)."""
    from condlora.image.build import build_denoiser
    from condlora.image.config import load_config
    from condlora.train.checkpoint import save_checkpoint, save_ema_model

    from .conftest import CONFIGS, TINY

    cfg = load_config(CONFIGS / "digits-classlora.yaml", TINY)
    denoiser = build_denoiser(cfg)
    folder.mkdir()
    save_ema_model(folder / "ema.safetensors", cfg, "image-diffusion", 1, denoiser)
    optimizer = torch.optim.Adam(denoiser.parameters())
    args = (cfg, "image-diffusion", 1, denoiser, copy.deepcopy(denoiser), optimizer)
    save_checkpoint(folder / "checkpoint.safetensors", *args)
    return denoiser.net.net


def test_lora_convert_takes_a_condlora_run_for_the_base_modules(tmp_path):
    from condlora.lora.formats import base_modules_of
    from condlora.lora.runtime import lora_layers

    backbone = tiny_condlora_run(tmp_path / "run")
    wanted = base_modules_of(backbone)  # the module paths condlora's LoRAs use, and shapes
    wrapped = list(lora_layers(backbone))
    for source in (tmp_path / "run", tmp_path / "run" / "checkpoint.safetensors"):
        found = load_base_modules(source)
        assert set(wrapped) <= set(found) and "enc.0.res.conv1" in found
        assert all(wanted[name] == shape for name, shape in found.items())
        assert not [n for n in found if ".base_layer" in n or ".composer" in n]
    # a kohya file on the run's LoRA-wrapped layers (1x1 convs) and a plain conv: by stems
    modules = {name: (*wanted[name][:2], wanted[name][2], 2, 4) for name in wrapped[:3]}
    modules["enc.0.res.conv1"] = (*wanted["enc.0.res.conv1"][:3], 1, 1)
    lora = make_lora(5, modules)
    kohya = tmp_path / "k.safetensors"
    write_lora(lora, kohya, "kohya")
    for i, base in enumerate([tmp_path / "run", tmp_path / "run" / "checkpoint.safetensors"]):
        out = tmp_path / f"peft{i}"
        args = ["lora", "convert", str(kohya), "--to", "peft", "--out", str(out)]
        assert main([*args, "--base-modules", str(base)]) == 0
        assert_same_deltas(read_lora(out), lora)


def test_a_checkpoint_of_another_task_is_no_base_model(tmp_path, capsys):
    from condlora.core.safetensors_io import write_weights

    path = tmp_path / "vae.safetensors"
    write_weights(
        path,
        {"vae.w.weight": torch.zeros(2, 2)},
        {"format": "condlora-ema-1", "kind": "synthesis-vae"},
    )
    with pytest.raises(LoRAError, match="condlora synthesis-vae checkpoint, not a base model"):
        load_base_modules(path)
    (tmp_path / "empty").mkdir()
    kohya = tmp_path / "k.safetensors"
    write_lora(make_lora(), kohya, "kohya")
    args = ["lora", "convert", str(kohya), "--to", "peft", "--out", str(tmp_path / "o")]
    assert main([*args, "--base-modules", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without ema.safetensors or checkpoint.safetensors" in err[0]
    assert not (tmp_path / "o").exists()


def test_detect_layout(tmp_path):
    weights = make_lora()
    write_lora(weights, tmp_path / "p", "peft")
    write_lora(weights, tmp_path / "d", "diffusers")
    write_lora(weights, tmp_path / "k.safetensors", "kohya")
    assert detect_layout(tmp_path / "p")[0] == "peft"
    assert detect_layout(tmp_path / "p" / "adapter_model.safetensors")[0] == "peft"
    assert detect_layout(tmp_path / "d") == (
        "diffusers",
        tmp_path / "d" / "pytorch_lora_weights.safetensors",
    )
    assert detect_layout(tmp_path / "k.safetensors")[0] == "kohya"


def test_cli_info_and_convert_with_rank(tmp_path, capsys):
    write_lora(make_lora(), tmp_path / "a", "peft")
    assert main(["lora", "info", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "layout: peft" in out and "alpha (scale x r): 5, 27" in out
    assert "rank(s): 1, 2, 4" in out and "scale(s): 2.5, 6.75, 27.0" in out
    assert "down_blocks.0.resnets.0.conv1" in out and "(8, 4, 3, 3)" in out
    kohya = tmp_path / "k.safetensors"
    assert main(["lora", "convert", str(tmp_path / "a"), "--to", "kohya", "--out", str(kohya)]) == 0
    assert main(["lora", "info", str(kohya)]) == 0
    out = capsys.readouterr().out
    assert "layout: kohya" in out and "alpha (scale x r): 27" in out  # one alpha per file
    assert "names: kohya stems" in out and "down_blocks_0_resnets_0_conv1" in out
    base = tmp_path / "base.txt"
    base.write_text("\n".join(BASE))
    args = ["lora", "convert", str(kohya), "--to", "peft", "--out", str(tmp_path / "r1")]
    assert main([*args, "--rank", "1", "--base-modules", str(base)]) == 0
    assert "energy dropped" in capsys.readouterr().out
    reduced = read_lora(tmp_path / "r1")
    assert set(reduced.ranks().values()) == {1}
    original = make_lora()
    for name, module in original.modules.items():
        u, s, vh = torch.linalg.svd(module.delta().reshape(module.delta_shape[0], -1))
        best = s[0] * torch.outer(u[:, 0], vh[0])  # plain reference: best rank-1 approximation
        got = reduced.modules[name].delta().reshape(best.shape)
        assert (got - best).norm() / best.norm() < 1e-5


def bad_inputs(tmp_path):
    """name -> a bad LoRA path (each needs one clear line and exit 2)."""
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    out = {}
    out["not safetensors"] = tmp_path / "junk.safetensors"
    out["not safetensors"].write_bytes(b"this is not a safetensors file at all" * 3)
    out["peft folder without config"] = tmp_path / "noconfig"
    out["peft folder without config"].mkdir()
    save_file(
        {"base_model.model.m.lora_A.weight": A},
        out["peft folder without config"] / "adapter_model.safetensors",
    )
    out["ranks differ"] = tmp_path / "ranks.safetensors"
    save_file(
        {"unet.m.lora_A.weight": A, "unet.m.lora_B.weight": torch.randn(8, 3)}, out["ranks differ"]
    )
    for label, value in (("nan", float("nan")), ("inf", float("inf"))):
        bad_b = B.clone()
        bad_b[3, 1] = value
        out[label] = tmp_path / f"{label}.safetensors"
        save_file(
            {"lora_unet_m.lora_down.weight": A, "lora_unet_m.lora_up.weight": bad_b}, out[label]
        )
    return out


def test_bad_inputs_give_one_line_and_leave_files_alone(tmp_path, capsys):
    existing = tmp_path / "existing.safetensors"
    write_lora(make_lora(), existing, "kohya")
    before = existing.read_bytes()
    expected = {
        "not safetensors": "not a readable safetensors file",
        "peft folder without config": "has no adapter_config.json",
        "ranks differ": "A has rank 2 but B has rank 3",
        "nan": "NaN or inf",
        "inf": "NaN or inf",
    }
    for label, path in bad_inputs(tmp_path).items():
        args = ["lora", "convert", str(path), "--to", "kohya", "--out", str(existing)]
        assert main(args) == 2, label
        err = capsys.readouterr().err
        assert err.startswith("condlora: error: ") and err.count("\n") == 1, err
        assert expected[label] in err, (label, err)
        assert main(["lora", "info", str(path)]) == 2
        capsys.readouterr()
    assert existing.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


@pytest.mark.slow
def test_cli_error_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"\x00" * 64)
    result = subprocess.run(
        [sys.executable, "-m", "condlora.cli", "lora", "info", str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("condlora: error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


TEXT = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("source", ["peft", "diffusers", "kohya"])
@pytest.mark.parametrize("target", ["peft", "diffusers", "kohya"])
def test_every_pair_of_layouts_keeps_every_dw(source, target, tmp_path):
    original = make_lora(5)
    g = torch.Generator().manual_seed(6)
    original.text_encoder[TEXT] = make_module(
        TEXT, torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 1.5, "t"
    )
    paths = {"peft": "p", "diffusers": "d.safetensors", "kohya": "k.safetensors"}
    write_lora(original, tmp_path / "a" / paths[source], source)
    first = read_lora(tmp_path / "a" / paths[source], list(BASE))
    write_lora(first, tmp_path / "b" / paths[target], target)
    last = read_lora(tmp_path / "b" / paths[target], list(BASE))
    assert last.unmapped == {} and first.unmapped == {}
    assert_same_deltas(last, original)
    # text encoders in every layout (peft: a folder per component, unet/ and text_encoder/)
    assert_same_deltas(LoRAWeights(last.text_encoder), LoRAWeights(original.text_encoder))


def test_kohya_header_carries_network_module_dim_and_alpha(tmp_path, capsys):
    lora = make_lora()
    write_lora(lora, tmp_path / "k.safetensors", "kohya")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "k.safetensors"), framework="pt") as f:
        header = f.metadata()
    assert header["ss_network_module"] == "networks.lora"
    assert header["ss_network_dim"] == str(max(lora.ranks().values()))
    alphas = load_file(tmp_path / "k.safetensors")
    alpha = next(float(v) for k, v in alphas.items() if k.endswith(".alpha"))
    assert float(header["ss_network_alpha"]) == alpha  # the file's one alpha
    assert main(["lora", "info", str(tmp_path / "k.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "ss_network_module: networks.lora" in out and "ss_network_dim:" in out


def header_of(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_modelspec_header_is_written_read_and_shown(tmp_path, capsys):
    # a cross-attention key projection 768 wide: a Stable Diffusion 1.x LoRA
    attn2 = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (8, 768, None, 1, 1)}
    lora = make_lora(3, MODULES | attn2)
    for layout, name in (("kohya", "my style.safetensors"), ("diffusers", "d.safetensors")):
        write_lora(lora, tmp_path / name, layout)
        header = header_of(tmp_path / name)
        assert header["modelspec.sai_model_spec"] == "1.0.0"
        assert header["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert header["modelspec.implementation"] == "diffusers"
        assert header["modelspec.resolution"] == "512x512"
        assert header["modelspec.title"] == name.removesuffix(".safetensors")
    # a source's own modelspec keys are read, shown and kept; its hash (of its own bytes) not
    source = tmp_path / "src.safetensors"
    spec = {
        "modelspec.title": "Ink",
        "modelspec.author": "A. Painter",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.license": "CC-BY-4.0",
        "modelspec.hash_sha256": "0xabc",
    }
    save_file(load_file(tmp_path / "my style.safetensors"), source, metadata=spec)
    assert read_lora(source).hints["modelspec.author"] == "A. Painter"
    assert main(["lora", "info", str(source)]) == 0
    out = capsys.readouterr().out
    assert (
        "metadata: modelspec.title: Ink" in out and "metadata: modelspec.license: CC-BY-4.0" in out
    )
    out_file = tmp_path / "out.safetensors"
    assert main(["lora", "convert", str(source), "--to", "kohya", "--out", str(out_file)]) == 0
    header = header_of(out_file)
    assert {k: header.get(k) for k in spec} == {**spec, "modelspec.hash_sha256": None}
    assert header["modelspec.sai_model_spec"] == "1.0.0"
