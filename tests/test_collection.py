"""`synth collect`: LoRA folders -> one memory-mapped dataset; intruders, bad input, memory."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from condlora.cli import main
from condlora.core.errors import DataError
from condlora.lora.formats import LoRAWeights, make_module, write_lora
from condlora.synthesis.collection import LoRADataset, collect

from .conftest import REPO

# module -> (out, in, kernel or None): the "base model"
BASE = {
    "down.attn.to_q": (6, 5, None),
    "down.attn.to_v": (6, 5, None),
    "down.resnet.conv1": (4, 3, 3),
    "up.proj_out": (7, 6, None),
}


def make_lora(seed, base=BASE, rank=2, alpha=27.0):
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (o, i, k) in base.items():
        A = torch.randn((rank, i, k, k) if k else (rank, i), generator=g)
        B = torch.randn((o, rank, 1, 1) if k else (o, rank), generator=g)
        modules[name] = make_module(name, A, B, alpha / rank, "test")
    return LoRAWeights(modules)


def build_folder(root):
    """Seven LoRAs of one base (peft, one diffusers, one kohya) and three intruders."""
    folder = root / "loras"
    members = {f"s{i}": make_lora(i, alpha=27.0 + i) for i in range(7)}
    for name in ("s0", "s1", "s2", "s3", "s4"):
        write_lora(members[name], folder / name, "peft")
    write_lora(members["s5"], folder / "s5.safetensors", "diffusers")
    write_lora(members["s6"], folder / "s6.safetensors", "kohya")
    write_lora(make_lora(10, rank=3), folder / "x_rank", "peft")
    fewer = {k: v for k, v in BASE.items() if k != "up.proj_out"}
    write_lora(make_lora(11, base=fewer), folder / "x_targets", "peft")
    other_base = {**BASE, "down.attn.to_v": (6, 9, None)}
    write_lora(make_lora(12, base=other_base), folder / "x_base", "peft")
    (folder / "notes.txt").write_text("not a LoRA; ignored")
    base_file = root / "base.json"
    shapes = {k: [o, i, k_, k_] if k_ else [o, i] for k, (o, i, k_) in BASE.items()}
    base_file.write_text(json.dumps(shapes))
    return folder, members, base_file


def write_embeddings(path, names, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = {name: torch.randn(dim, generator=g) for name in names}
    save_file(emb, path)
    return emb


def assert_maps_back(dataset, members):
    for i, name in enumerate(dataset.names):
        got, want = dataset.lora(i), members[name]
        for module, m in want.modules.items():
            delta = m.delta()
            err = (got.modules[module].delta() - delta).norm() / delta.norm()
            assert err < 1e-5, (name, module, float(err))


def test_collect_takes_the_majority_and_names_intruders(tmp_path, capsys):
    folder, members, base_file = build_folder(tmp_path)
    names = list(members)
    emb = write_embeddings(tmp_path / "emb.safetensors", names + ["unused"])
    out = tmp_path / "data.safetensors"
    args = ["synth", "collect", "--loras", str(folder), "--out", str(out)]
    assert (
        main(
            [
                *args,
                "--embeddings",
                str(tmp_path / "emb.safetensors"),
                "--base-modules",
                str(base_file),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "skipped x_rank: other rank: 3 instead of 2" in printed
    assert "skipped x_targets: other target modules: 1 missing (e.g. up.proj_out)" in printed
    assert "skipped x_base: other base model:" in printed and "down.attn.to_v" in printed
    assert "took 7 LoRAs, skipped 3" in printed

    dataset = LoRADataset(out)
    assert dataset.names == names and len(dataset) == 7
    assert dataset.dim == sum(2 * (i * (k or 1) ** 2 + o) for o, i, k in BASE.values())
    assert {name for name, _ in dataset.skipped} == {"x_rank", "x_targets", "x_base"}
    assert_maps_back(dataset, members)
    matrix = np.asarray(dataset.vectors, dtype=np.float64)
    np.testing.assert_allclose(dataset.mean.numpy(), matrix.mean(0), atol=1e-5)
    np.testing.assert_allclose(dataset.std.numpy(), matrix.std(0), atol=1e-5)
    for i, name in enumerate(names):
        assert torch.equal(dataset.embedding(i), emb[name])
    # the file is plain safetensors: safetensors' own reader agrees
    plain = load_file(out)
    assert np.array_equal(plain["vectors"].numpy(), np.asarray(dataset.vectors))
    assert plain["embeddings"].shape == (7, 5)


def test_chunked_writing_gives_the_same_dataset(tmp_path):
    folder, members, _ = build_folder(tmp_path)
    whole = collect(folder, tmp_path / "a.safetensors", base_modules=list(BASE))
    report = collect(folder, tmp_path / "b.safetensors", base_modules=list(BASE), chunk_bytes=1)
    assert whole.taken == report.taken == list(members)
    # without shapes of the base, the other base model shows in the factor shapes
    reasons = dict(report.skipped)
    assert (
        reasons["x_base"] == "other base model: module down.attn.to_v is (6, 9) instead of (6, 5)"
    )
    a, b = LoRADataset(tmp_path / "a.safetensors"), LoRADataset(tmp_path / "b.safetensors")
    assert np.array_equal(np.asarray(a.vectors), np.asarray(b.vectors))
    torch.testing.assert_close(a.mean, b.mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.std, b.std, atol=1e-6, rtol=0)
    chunks = list(b.chunks(rows=3))
    assert [first for first, _ in chunks] == [0, 3, 6]
    assert np.array_equal(np.concatenate([c for _, c in chunks]), np.asarray(a.vectors))


def test_kohya_without_base_modules_is_skipped(tmp_path):
    folder, _, _ = build_folder(tmp_path)
    report = collect(folder, tmp_path / "a.safetensors")
    assert "--base-modules" in dict(report.skipped)["s6"]
    assert "s6" not in report.taken and len(report.taken) == 6


def test_bad_collections_give_one_line_and_keep_the_old_dataset(tmp_path, capsys):
    folder, members, base_file = build_folder(tmp_path)
    out = tmp_path / "data.safetensors"
    base_args = ["synth", "collect", "--loras", str(folder), "--out", str(out)]
    base_args += ["--base-modules", str(base_file)]
    assert main(base_args) == 0
    before = out.read_bytes()
    capsys.readouterr()

    names = list(members)
    cases = {}
    write_embeddings(tmp_path / "missing.safetensors", names[:-1])
    cases["missing.safetensors"] = "no embedding for LoRA 's6'"
    save_file({n: torch.randn(6 if n == "s3" else 5) for n in names}, tmp_path / "dim.safetensors")
    cases["dim.safetensors"] = "'s3' has shape (6,), expected one vector of shape (5,)"
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 20)
    cases["junk.safetensors"] = "not a readable safetensors file"
    for file, message in cases.items():
        assert main([*base_args, "--embeddings", str(tmp_path / file)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("condlora: error: ") and err.count("\n") == 1 and message in err, err

    (folder / "broken.safetensors").write_bytes(b"\x01" * 100)
    assert main(base_args) == 2
    err = capsys.readouterr().err
    assert "broken.safetensors is not a readable safetensors file" in err and err.count("\n") == 1
    assert out.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))

    assert main([*base_args, "--skip-bad"]) == 0
    assert "skipped broken: unreadable:" in capsys.readouterr().out


MEMORY_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from condlora.synthesis.collection import LoRADataset, collect
    from condlora.lora.formats import read_lora

    def peak_mib():
        # peak resident memory since the last reset (VmHWM; reset by writing 5 to clear_refs)
        status = open("/proc/self/status").read()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024

    torch.set_num_threads(1)
    big, small, out = sys.argv[1:4]
    collect(small, out + ".warm")  # load every code path on a tiny collection first
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = peak_mib()
    report = collect(big, out)
    after_collect = peak_mib()
    data = LoRADataset(out)
    total = np.zeros(data.dim)
    for _, chunk in data.chunks(rows=8):
        total += chunk.sum(0, dtype=np.float64)
    mean_error = float(np.abs(total / len(data) - data.mean.numpy()).max())
    last = len(data) - 1
    probe = torch.randn(4096, 1)  # dW @ probe = scale * B (A probe): no 64 MiB dW formed
    apply = lambda m: m.scale * (m.B @ (m.A @ probe))
    want = apply(read_lora(f"{big}/{data.names[last]}.safetensors").modules["block3.proj"])
    got = apply(data.lora(last).modules["block3.proj"])
    print(json.dumps(dict(
        rows=len(report.taken),
        matrix_mib=len(data) * data.dim * 4 / 2**20,
        collect_growth=after_collect - start,
        total_growth=peak_mib() - start,
        mean_error=mean_error,
        map_error=float((got - want).norm() / want.norm()),
    )))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="peak memory read from /proc (VmHWM)")
def test_collection_larger_than_the_memory_growth(tmp_path):
    """200 MiB of vectors, written and read back by a process that grows by < 50 MiB."""
    big, small = tmp_path / "big", tmp_path / "small"
    g = torch.Generator().manual_seed(0)
    for i in range(200):  # 1 MiB per LoRA: four modules of rank 8, 4096 inputs and outputs
        factors = torch.randn(4, 2, 8, 4096, generator=g)
        modules = {
            f"block{j}.proj": make_module(f"block{j}.proj", a, b.T, 27 / 8, "test")
            for j, (a, b) in enumerate(factors)
        }
        write_lora(LoRAWeights(modules), big / f"lora{i:03d}.safetensors", "diffusers")
    for i in range(2):
        write_lora(make_lora(i), small / f"tiny{i}", "peft")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_CHILD,
            str(big),
            str(small),
            str(tmp_path / "data.safetensors"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(figures)
    assert figures["rows"] == 200 and figures["matrix_mib"] >= 4 * 50
    assert figures["collect_growth"] < 50 and figures["total_growth"] < 50
    assert figures["mean_error"] < 1e-5 and figures["map_error"] < 1e-5


def test_dataset_inside_the_lora_folder_and_other_files(tmp_path):
    folder, _, base_file = build_folder(tmp_path)
    out = folder / "data.safetensors"  # written where the LoRAs are: not read as a LoRA
    for _ in range(2):
        report = collect(folder, out, base_modules=list(BASE))
        assert "data" not in report.taken and "data" not in dict(report.skipped)
    with pytest.raises(DataError, match="not a condlora LoRA dataset"):
        LoRADataset(folder / "s5.safetensors")
    with pytest.raises(DataError, match="is a folder"):
        collect(folder, tmp_path, base_modules=list(BASE))
