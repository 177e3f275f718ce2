"""`synth import-w2w`: weights2weights' one-tensor collection -> a dataset whose row i, written
as a peft file, holds the numbers of the tensor's row i (small synthetic w2w files)."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from condlora.cli import main
from condlora.core.safetensors_io import load_torch_weights_only
from condlora.lora.formats import write_lora
from condlora.synthesis import bigfile
from condlora.synthesis.collection import LoRADataset

from .conftest import tiny_unet2d_condition
from .synth_common import TINY

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("diffusers")

N = 7


def w2w_order(unet):
    """The U-Net's to_q / to_v modules as w2w lays them out: down, mid, up blocks."""
    names = [n for n, _ in unet.named_modules() if n.endswith((".to_q", ".to_v"))]
    return [n for b in ("down_blocks", "mid_block", "up_blocks") for n in names if n.startswith(b)]


@pytest.fixture(scope="module")
def w2w_files(tmp_path_factory):
    """A tiny U-Net's config.json and fake all_weights.pt / weight_dimensions.pt of N rows."""
    root = tmp_path_factory.mktemp("w2w")
    unet = tiny_unet2d_condition()
    unet.save_config(root / "unet")
    modules = dict(unet.named_modules())
    dims = {}
    for name in w2w_order(unet):
        stem = "lora_unet_" + name.replace(".", "_")
        m = modules[name]
        dims[f"{stem}.lora_A.weight"] = ((m.in_features,), torch.Size([1, m.in_features]))
        dims[f"{stem}.lora_B.weight"] = ((m.out_features,), torch.Size([m.out_features, 1]))
    width = sum(numel for (numel,), _ in dims.values())
    rows = torch.randn(N, width, generator=torch.Generator().manual_seed(0))
    torch.save(rows, root / "all_weights.pt")
    torch.save(dims, root / "weight_dimensions.pt")
    return root, rows, dims


def row_tensors(row, dims):
    """Row -> {key: tensor} as w2w unflattens it (the plain reference)."""
    out, counter = {}, 0
    for key, ((numel,), shape) in dims.items():
        out[key] = row[counter : counter + numel].reshape(shape)
        counter += numel
    return out


def peft_tensors(lora, folder):
    """The factors of a LoRA written as a peft folder, keyed as w2w keys them."""
    write_lora(lora, folder, "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 1  # scale 1: the numbers are the LoRA's
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, tensor in tensors.items():
        module, factor = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        out["lora_unet_" + module.replace(".", "_") + ".lora_" + factor] = tensor
    return out


def test_import_with_dims_keeps_every_row(w2w_files, tmp_path):
    root, rows, dims = w2w_files
    out = tmp_path / "w2w.safetensors"
    args = [str(root / "all_weights.pt"), "--dims", str(root / "weight_dimensions.pt")]
    assert main(["synth", "import-w2w", *args, "--out", str(out), "--alpha", "1"]) == 0
    dataset = LoRADataset(out)
    assert len(dataset) == N and dataset.alignment == "none"
    for i in (0, 3, N - 1):
        written = peft_tensors(dataset.lora(i), tmp_path / f"row{i}")
        expected = row_tensors(rows[i], dims)
        assert written.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(written[key], tensor), key
    assert torch.allclose(dataset.mean, rows.mean(0)[_source(dataset, dims)], atol=1e-6)


def _source(dataset, dims):
    """The w2w column of each of the dataset's columns (from the two plain layouts)."""
    keys = list(dims)
    starts = torch.tensor([0] + [dims[k][0][0] for k in keys]).cumsum(0)
    index = torch.empty(dataset.dim, dtype=torch.long)
    for e in dataset.spec.entries:
        stem = "lora_unet_" + e.module.replace(".", "_") + f".lora_{e.factor}.weight"
        start = starts[keys.index(stem)]
        index[e.offset : e.offset + e.size] = torch.arange(start, start + e.size)
    return index


def test_the_unet_layout_equals_the_dims_layout_and_alpha_goes_into_b(w2w_files, tmp_path):
    """Without --dims the layout comes from the U-Net's config.json; the default alpha 27
    (w2w's, rank 1) is folded into B: the same dW as w2w's file read with lora_alpha 27."""
    root, rows, dims = w2w_files
    with_dims, from_unet = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    weights = str(root / "all_weights.pt")
    dims_args = ["--dims", str(root / "weight_dimensions.pt"), "--alpha", "1"]
    assert main(["synth", "import-w2w", weights, *dims_args, "--out", str(with_dims)]) == 0
    base = ["--base-modules", str(root / "unet" / "config.json")]
    assert main(["synth", "import-w2w", weights, *base, "--out", str(from_unet)]) == 0
    both = tmp_path / "c.safetensors"  # the dims' kohya stems mapped through the U-Net's modules
    assert main(["synth", "import-w2w", weights, *dims_args, *base, "--out", str(both)]) == 0
    a, b = LoRADataset(with_dims), LoRADataset(from_unet)
    assert a.spec == b.spec == LoRADataset(both).spec
    assert (a.vectors[:] == LoRADataset(both).vectors[:]).all()
    for i in range(N):
        plain, scaled = a.lora(i), b.lora(i)
        for name, m in plain.modules.items():
            assert torch.equal(scaled.modules[name].A, m.A)
            assert torch.allclose(scaled.modules[name].B, 27 * m.B, rtol=1e-6, atol=0)


def test_rows_are_written_in_chunks(w2w_files, tmp_path, monkeypatch):
    """The tensor is never held whole: every write of vectors carries at most a chunk."""
    from condlora.synthesis.w2w import import_w2w

    root, rows, _ = w2w_files
    seen = []
    write = bigfile.StreamWriter.write

    def recording(self, array):
        seen.append(array.shape)
        write(self, array)

    monkeypatch.setattr(bigfile.StreamWriter, "write", recording)
    chunk = 2 * rows.shape[1] * 4  # two rows
    out = tmp_path / "c.safetensors"
    import_w2w(root / "all_weights.pt", out, root / "weight_dimensions.pt", chunk_bytes=chunk)
    vectors = [s for s in seen if len(s) == 2 and s[1] == rows.shape[1]]
    assert [s[0] for s in vectors] == [2, 2, 2, 1]


def test_plain_reads_equal_the_memory_map_and_other_dtypes_are_read(
    w2w_files, tmp_path, monkeypatch
):
    """torch.save's archive read with plain file reads gives what the memory map gives; a
    bfloat16 tensor, or a view of a bigger one (read through the map), is read too."""
    from condlora.synthesis import w2w

    root, rows, _ = w2w_files
    dims = root / "weight_dimensions.pt"
    imported = {}
    sources = {
        "plain": rows,
        "bf16": rows.bfloat16(),
        "view": torch.cat([rows, rows], dim=1)[:, : rows.shape[1]],  # not contiguous
    }
    for name, tensor in sources.items():
        torch.save(tensor, tmp_path / f"{name}.pt")
        loaded = load_torch_weights_only(tmp_path / f"{name}.pt", "weights", mmap=True)
        offset = w2w._data_offset(tmp_path / f"{name}.pt", loaded)
        assert (offset is None) == (name == "view")
        w2w.import_w2w(tmp_path / f"{name}.pt", tmp_path / f"{name}.ds", dims, alpha=1.0)
        imported[name] = LoRADataset(tmp_path / f"{name}.ds").vectors[:]
    monkeypatch.setattr(w2w, "_data_offset", lambda path, weights: None)
    w2w.import_w2w(tmp_path / "plain.pt", tmp_path / "mapped.ds", dims, alpha=1.0)
    assert (LoRADataset(tmp_path / "mapped.ds").vectors[:] == imported["plain"]).all()
    assert (imported["view"] == imported["plain"]).all()
    as_bf16 = torch.from_numpy(imported["plain"].copy()).bfloat16().float().numpy()
    assert (imported["bf16"] == as_bf16).all()


def test_train_vae_accepts_the_import(w2w_files, tmp_path):
    root, _, _ = w2w_files
    out = tmp_path / "w2w.safetensors"
    args = ["--dims", str(root / "weight_dimensions.pt"), "--out", str(out)]
    assert main(["synth", "import-w2w", str(root / "all_weights.pt"), *args]) == 0
    common = ["--dataset", str(out), "--out", str(tmp_path / "model"), "--quiet", *TINY]
    assert main(["synth", "train-vae", *common, "vae_train.batch_size=4"]) == 0


def fails(capsys, args, pattern, out):
    assert main(["synth", "import-w2w", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("condlora: error: ") and "\n" not in err, err
    assert pattern in err, err
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_bad_inputs_are_one_line_and_write_nothing(w2w_files, tmp_path, capsys):
    root, rows, dims = w2w_files
    dims_args = ["--dims", str(root / "weight_dimensions.pt")]
    out = tmp_path / "never.safetensors"
    torch.save(rows[0], tmp_path / "flat.pt")
    fails(capsys, [str(tmp_path / "flat.pt"), *dims_args], "holds a 1-d tensor", out)
    torch.save({"w": rows}, tmp_path / "dict.pt")
    fails(capsys, [str(tmp_path / "dict.pt"), *dims_args], "holds no tensor", out)
    torch.save(rows[:, :-3], tmp_path / "narrow.pt")
    width = rows.shape[1]
    fails(capsys, [str(tmp_path / "narrow.pt"), *dims_args], f"{width - 3} numbers", out)
    base = ["--base-modules", str(root / "unet" / "config.json")]
    fails(capsys, [str(tmp_path / "narrow.pt"), *base], f"lays out {width}", out)
    torch.save(argparse.Namespace(w=rows), tmp_path / "code.pt")  # a pickled object
    fails(capsys, [str(tmp_path / "code.pt"), *dims_args], "refused", out)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    fails(capsys, [str(tmp_path / "junk.pt"), *dims_args], "not a readable torch file", out)
    fails(capsys, [str(root / "all_weights.pt")], "give --dims", out)
    torch.save({"x.weight": ((3,), (1, 4))}, tmp_path / "bad_dims.pt")
    fails(
        capsys,
        [str(root / "all_weights.pt"), "--dims", str(tmp_path / "bad_dims.pt")],
        "3 numbers",
        out,
    )


def test_the_sd15_layout_is_w2w_width():
    """SD 1.5's U-Net (the class defaults, on the meta device) lays out 99,648 numbers, down
    blocks first, then the mid block, then the up blocks."""
    from diffusers import UNet2DConditionModel

    from condlora.lora.formats import base_modules_of
    from condlora.synthesis.w2w import layout, parts_from_unet

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    parts = parts_from_unet(base_modules_of(unet))
    assert [p.module for p in parts[::2]] == w2w_order(unet)
    assert parts[0].module == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert parts[47].module.startswith("down_blocks.2") and parts[48].module.startswith("mid_block")
    assert layout(parts, "SD 1.5")[0].size == 99648
