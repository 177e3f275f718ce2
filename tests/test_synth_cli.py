"""`condlora synth` bad input gets one line and exit code 2, nothing already written lost;
`condlora info` on the paper's config."""

import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from condlora.cli import main
from condlora.lora.formats import LoRAWeights, make_module
from condlora.synthesis.collection import write_dataset
from condlora.synthesis.flatten import FlatSpec

from .conftest import CONFIGS
from .synth_common import SPEC, TINY, linear_collection

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fails_in_one_line(capsys, args, pattern):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("condlora: error: ") and "\n" not in err, err
    assert re.search(pattern, err), err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model folder trained without condition dropout, and its dataset."""
    root = tmp_path_factory.mktemp("cli")
    dataset = linear_collection(root / "a.safetensors")[0]
    common = ["--dataset", str(dataset), "--out", str(root / "model"), "--quiet", *TINY]
    assert main(["synth", "train-vae", *common]) == 0
    assert main(["synth", "train-prior", *common, "prior.cond_dropout=0"]) == 0
    return root, dataset, root / "model"


def other_layout_dataset(path):
    """A collection of rank-2 LoRAs on other modules (another layout)."""
    modules = {"up.proj": make_module("up.proj", torch.zeros(2, 3), torch.zeros(4, 2), 1.0, "t")}
    spec = FlatSpec.of(LoRAWeights(modules))
    g = torch.Generator().manual_seed(0)
    names = [f"o{i}" for i in range(16)]
    vectors = torch.randn(16, spec.size, generator=g)
    return write_dataset(path, names, spec, vectors, torch.randn(16, 4))


def test_wrong_embedding_dimension(trained, tmp_path, capsys):
    _, _, model = trained
    save_file({"e": torch.randn(3)}, str(tmp_path / "e3.safetensors"))
    out = tmp_path / "kept.safetensors"
    out.write_bytes(b"written before")  # not a LoRA: never overwritten
    args = ["synth", "generate", "--model", str(model), "--format", "kohya", "--out", str(out)]
    save_file({"e": torch.randn(4)}, str(tmp_path / "e4.safetensors"))
    e4 = ["--embedding", str(tmp_path / "e4.safetensors")]
    fails_in_one_line(capsys, [*args, *e4], "kept.safetensors exists and is not a LoRA file")
    stem = "lora_unet_mid_block_attentions_0_proj_in"  # an older LoRA: replaced by a success
    save_file(
        {f"{stem}.lora_down.weight": torch.ones(1, 4), f"{stem}.lora_up.weight": torch.ones(4, 1)},
        str(out),
    )
    before = out.read_bytes()
    fails_in_one_line(
        capsys, [*args, "--embedding", str(tmp_path / "e3.safetensors")], r"trained on 4-d"
    )
    assert out.read_bytes() == before
    save_file({"e": torch.full((4,), float("nan"))}, str(tmp_path / "nan.safetensors"))
    fails_in_one_line(capsys, [*args, "--embedding", str(tmp_path / "nan.safetensors")], "NaN")
    fails_in_one_line(capsys, [*args, *e4, "--num", "0"], "--num must be at least 1")
    assert out.read_bytes() == before
    assert main([*args, *e4]) == 0 and out.read_bytes() != before


def test_guidance_without_condition_dropout(trained, tmp_path, capsys):
    _, _, model = trained
    e = tmp_path / "e.safetensors"
    save_file({"e": torch.randn(4)}, str(e))
    args = ["synth", "generate", "--model", str(model), "--embedding", str(e)]
    args += ["--out", str(tmp_path / "lora")]
    fails_in_one_line(capsys, [*args, "--guidance", "2"], "without condition dropout")
    assert not (tmp_path / "lora").exists()
    assert main([*args, "--guidance", "1"]) == 0  # 1 is no guidance at all


def test_model_folder_of_another_layout(trained, tmp_path, capsys):
    root, _, model = trained
    before = snapshot(model)
    other = other_layout_dataset(tmp_path / "other.safetensors")
    prior = ["synth", "train-prior", "--dataset", str(other), "--quiet", *TINY]
    pattern = r"trained on a collection of another layout \(2 modules, 22 numbers.*\) than"
    fails_in_one_line(capsys, [*prior, "--vae", str(model), "--out", str(tmp_path / "p")], pattern)
    assert not (tmp_path / "p").exists()
    fails_in_one_line(capsys, [*prior, "--out", str(model)], pattern)
    # a folder whose prior comes from a model of another layout
    mixed = tmp_path / "mixed"
    train = ["synth", "train", "--config", str(config(tmp_path, other)), "--out", str(mixed)]
    assert main([*train, "--quiet", *TINY]) == 0
    shutil.rmtree(mixed / "prior")
    shutil.copytree(model / "prior", mixed / "prior")
    e = tmp_path / "e.safetensors"
    save_file({"e": torch.randn(4)}, str(e))
    gen = ["synth", "generate", "--model", str(mixed), "--embedding", str(e)]
    fails_in_one_line(capsys, [*gen, "--out", str(tmp_path / "x")], "its prior was trained on")
    assert snapshot(model) == before


def config(folder, dataset):
    """A minimal synthesis config file on a dataset (TINY shrinks it on the command line)."""
    path = folder / "tiny.yaml"
    path.write_text(f"kind: synthesis\nname: tiny\ndataset: {dataset}\n")
    return path


def test_other_bad_input(trained, tmp_path, capsys):
    root, dataset, model = trained
    before = snapshot(model)
    vae = ["synth", "train-vae", "--dataset", str(dataset), "--quiet", *TINY]
    fails_in_one_line(capsys, [*vae, "--out", str(model)], "already holds a")
    fails_in_one_line(
        capsys, [*vae, "--out", str(tmp_path / "v"), "vae.latnet=3"], "did you mean 'latent'"
    )
    fails_in_one_line(capsys, [*vae, "--out", str(tmp_path / "v"), "method=gan"], "pca, nearest")
    fails_in_one_line(capsys, [*vae, "--out", str(tmp_path / "v"), "dim=7"], "dim = 7.*has 22")
    fails_in_one_line(
        capsys,
        ["synth", "generate", "--model", str(tmp_path), "--embedding", "e", "--out", "o"],
        "not a synthesis model folder",
    )
    assert snapshot(model) == before


def test_prior_and_baselines_need_embeddings(tmp_path, capsys):
    path = tmp_path / "noemb.safetensors"
    write_dataset(path, [f"s{i}" for i in range(16)], SPEC, torch.randn(16, SPEC.size))
    for method in ("diffusion", "pca", "nearest"):
        args = ["synth", "train", "--config", str(config(tmp_path, path)), "--out"]
        args += [str(tmp_path / method), "--quiet", *TINY, f"method={method}"]
        fails_in_one_line(capsys, args, "holds no embeddings")


def test_info_on_the_paper_config(capsys):
    assert main(["info", "--config", str(CONFIGS / "synthesis" / "w2w-sd15.yaml")]) == 0
    out = capsys.readouterr().out
    assert "LoRA vector D: 99,648" in out and "condition embedding E: 512" in out
    d, latent, hidden = 99648, 512, 1024

    def resmlp(dim_in, dim_out, depth=2):  # stem, blocks (norm, fc1, fc2), out norm, out
        block = 2 * hidden + (hidden * 2 * hidden + 2 * hidden) + (2 * hidden * hidden + hidden)
        return dim_in * hidden + hidden + depth * block + 2 * hidden + hidden * dim_out + dim_out

    vae = resmlp(d, 2 * latent) + resmlp(latent, d)
    assert f"VAE: latent 512, hidden 1024, depth 2, beta 0.01: {vae:,} parameters" in out
    assert re.search(r"prior: mlp width 1024, depth 6, cond_mode adalora, .* on 512-d", out)
    assert main(["synth", "info", "--config", str(CONFIGS / "synthesis" / "w2w-sd15.yaml")]) == 0
    assert capsys.readouterr().out == out


def test_the_paper_config_has_the_sd15_to_q_to_v_size():
    """99,648 = rank-1 factors of every to_q / to_v of a Stable Diffusion 1.5 U-Net."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):  # SD 1.5's U-Net: the class defaults; no memory
        unet = diffusers.UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    sizes = [
        m.in_features + m.out_features
        for name, m in unet.named_modules()
        if name.endswith(("to_q", "to_v"))
    ]
    assert len(sizes) == 64 and sum(sizes) == 99648


def test_a_resume_with_a_damaged_checkpoint_writes_nothing(trained, tmp_path, capsys):
    """`synth train --resume` reads every checkpoint it would continue before any stage writes:
    a truncated prior checkpoint is refused in one line and the model folder stays as it was."""
    _, dataset, model = trained
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    prior = folder / "prior" / "checkpoint.safetensors"
    prior.write_bytes(prior.read_bytes()[: prior.stat().st_size // 2])
    before = snapshot(folder)
    config = tmp_path / "synth.yaml"
    config.write_text("name: tiny\n")
    args = ["synth", "train", "--config", str(config), "--dataset", str(dataset)]
    args += ["--out", str(folder), "--resume", "--quiet", *TINY, "prior.cond_dropout=0"]
    fails_in_one_line(capsys, args, r"prior.checkpoint\.safetensors")
    assert snapshot(folder) == before
    assert not list(folder.rglob("*.tmp"))


def test_output_paths_under_a_file_are_one_line(trained, tmp_path, capsys):
    """An --out whose parent is a file (issue 24): refused in one line, nothing written."""
    _, dataset, model = trained
    (tmp_path / "afile").write_text("x")
    e = tmp_path / "e.safetensors"
    save_file({"e": torch.randn(4)}, str(e))
    generate = ["synth", "generate", "--model", str(model), "--embedding", str(e)]
    for fmt in ("peft", "kohya"):
        out = tmp_path / "afile" / f"lora-{fmt}"
        fails_in_one_line(capsys, [*generate, "--format", fmt, "--out", str(out)], "afile")
    loras = tmp_path / "loras"
    loras.mkdir()
    collect = ["synth", "collect", "--loras", str(loras), "--embeddings", str(e)]
    fails_in_one_line(
        capsys, [*collect, "--out", str(tmp_path / "afile" / "d.safetensors")], "afile"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "e.safetensors", "loras"]
