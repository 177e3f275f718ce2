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

    # odd but parseable files (issue 24): named with the reason, the rest collected
    (folder / "broken.safetensors").unlink()
    before = out.read_bytes()
    odd = {"zero_alpha": torch.zeros(0), "two_alphas": torch.ones(2)}
    for name, alpha in odd.items():
        lora = {f"unet.{name}.lora_A.weight": torch.ones(2, 4)}
        lora |= {f"unet.{name}.lora_B.weight": torch.ones(4, 2), f"unet.{name}.alpha": alpha}
        save_file(lora, folder / f"{name}.safetensors")
    save_file(
        {"unet.m.lora_A.weight": torch.ones(0, 4), "unet.m.lora_B.weight": torch.ones(4, 0)},
        folder / "rank_zero.safetensors",
    )
    assert main(base_args) == 2
    err = capsys.readouterr().err
    assert err.startswith("condlora: error: ") and err.count("\n") == 1, err
    assert "rank_zero.safetensors: module m has rank 0" in err  # the first bad one, by name
    assert out.read_bytes() == before
    assert main([*base_args, "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "skipped rank_zero: unreadable:" in printed and "has rank 0" in printed
    assert "skipped zero_alpha: unreadable:" in printed and "alpha must be one number" in printed
    assert "skipped two_alphas: unreadable:" in printed
    assert f"took {len(members)} LoRAs" in printed


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


@pytest.mark.slow
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


# ---------------------------------------------------------------- alignment across the collection


def _tied_lora(delta, g, alpha=2.0):
    """A rank-1 module whose left singular vector has two near-tied largest entries of opposite
    signs (which one wins flips with the sign of `delta`), and a rank-2 module near a common one."""
    u = torch.tensor([0.6, -0.6 + delta, 0.3, 0.2])
    a = torch.tensor([[0.5, -1.0, 0.25, 0.8, 0.1]])
    common = torch.arange(12.0).reshape(2, 6).sin()
    modules = {
        "flip.to_q": make_module("flip.to_q", a, 2.0 * u[:, None], alpha, "test"),
        "other.to_v": make_module(
            "other.to_v",
            common + 0.05 * torch.randn(2, 6, generator=g),
            common.T[:4] + 0.05 * torch.randn(4, 2, generator=g),
            alpha / 2,
            "test",
        ),
    }
    return LoRAWeights(modules)


def test_alignment_keeps_near_updates_near_where_the_sign_rule_flips(tmp_path):
    g = torch.Generator().manual_seed(0)
    members = {"near_a": _tied_lora(-0.01, g), "near_b": _tied_lora(0.01, g)}
    for i in range(4):
        members[f"other{i}"] = _tied_lora(0.15 * float(torch.randn(1, generator=g)), g)
    same = {  # near_a's dW in another basis and scale
        n: make_module(n, m.A * 3.0, m.B / 3.0 * 2.0, m.scale / 2.0, "test")
        for n, m in members["near_a"].modules.items()
    }
    members["same_as_a"] = LoRAWeights(same)
    folder = tmp_path / "loras"
    for name, weights in members.items():
        write_lora(weights, folder / name, "peft")
    collect(folder, tmp_path / "aligned.safetensors")
    collect(folder, tmp_path / "plain.safetensors", aligned=False)
    aligned, plain = (
        LoRADataset(tmp_path / "aligned.safetensors"),
        LoRADataset(tmp_path / "plain.safetensors"),
    )
    assert aligned.alignment == "reference" and aligned.reference.shape == (aligned.dim,)
    assert plain.alignment == "none" and plain.reference is None
    assert_maps_back(aligned, members)  # the same dW, whatever the rotation

    def row(dataset, name):
        return dataset.row(dataset.index(name))

    flip = slice(0, 9)  # the rank-1 module's A (5) and B (4): first in the layout
    assert aligned.spec.entries[0].module == "flip.to_q"
    a, b = row(aligned, "near_a"), row(aligned, "near_b")
    pa, pb = row(plain, "near_a"), row(plain, "near_b")
    # the per-LoRA rule flips the pair: opposite vectors for nearly equal updates
    assert float((pa[flip] + pb[flip]).norm()) < 0.05 * float(pa[flip].norm())
    # aligned to the collection's reference, they are near
    assert float((a[flip] - b[flip]).norm()) < 0.05 * float(a[flip].norm())
    # the same dW, the same vector
    torch.testing.assert_close(row(aligned, "same_as_a"), a, atol=1e-5, rtol=0)

    # held-out LoRAs in the training collection's coordinates: the same rows as there
    held = tmp_path / "held"
    for name in ("near_b", "other2"):
        write_lora(members[name], held / name, "diffusers")
    collect(held, tmp_path / "held.safetensors", align_to=tmp_path / "aligned.safetensors")
    held_ds = LoRADataset(tmp_path / "held.safetensors")
    for name in ("near_b", "other2"):
        torch.testing.assert_close(row(held_ds, name), row(aligned, name), atol=1e-6, rtol=0)
    torch.testing.assert_close(held_ds.reference, aligned.reference)
    with pytest.raises(DataError, match="has no alignment reference"):
        collect(held, tmp_path / "x.safetensors", align_to=tmp_path / "plain.safetensors")
    _, _, _ = build_folder(tmp_path / "other")
    with pytest.raises(DataError, match="another layout"):
        collect(
            tmp_path / "other" / "loras",
            tmp_path / "y.safetensors",
            base_modules=list(BASE),
            align_to=tmp_path / "aligned.safetensors",
        )


def test_cli_alignment_options(tmp_path, capsys):
    folder, _, base_file = build_folder(tmp_path)
    args = ["synth", "collect", "--loras", str(folder), "--base-modules", str(base_file)]
    assert main([*args, "--out", str(tmp_path / "a.safetensors")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.safetensors"), "--no-align"]) == 0
    align_to = ["--align-to", str(tmp_path / "a.safetensors")]
    assert main([*args, "--out", str(tmp_path / "c.safetensors"), *align_to]) == 0
    a, b, c = (LoRADataset(tmp_path / f"{n}.safetensors") for n in "abc")
    assert (a.alignment, b.alignment, c.alignment) == ("reference", "none", "reference")
    assert np.array_equal(np.asarray(a.vectors), np.asarray(c.vectors))
    assert not np.allclose(np.asarray(a.vectors), np.asarray(b.vectors), atol=1e-3)
    capsys.readouterr()
    bad = ["--out", str(tmp_path / "d.safetensors"), "--align-to", str(tmp_path / "b.safetensors")]
    assert main([*args, *bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no alignment reference" in err


def test_collect_refactorises_a_lora_of_another_rank_whose_dw_fits(tmp_path, capsys):
    folder, out = tmp_path / "loras", tmp_path / "data.safetensors"
    members = {f"s{i}": make_lora(i) for i in range(3)}  # the collection's rank: 2
    members["low"] = make_lora(7, rank=1)  # rank 1: its dW fits rank 2 exactly
    wide = make_lora(8)  # rank-4 factors of a rank-2 dW (B's last two columns zero)
    members["wide"] = LoRAWeights(
        {
            n: make_module(
                n, torch.cat([m.A, torch.ones_like(m.A)]), torch.cat([m.B, 0 * m.B], 1), 2.0, "t"
            )
            for n, m in wide.modules.items()
        }
    )
    for name, lora in members.items():
        write_lora(lora, folder / name, "peft")
    write_lora(make_lora(9, rank=3), folder / "x_rank", "peft")  # a rank-3 dW: cannot fit
    assert main(["synth", "collect", "--loras", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "re-factorised low: another rank" in printed and "re-factorised wide:" in printed
    assert "skipped x_rank: other rank: 3 instead of 2 (module " in printed
    assert "its dW has rank 3" in printed
    dataset = LoRADataset(out)
    assert sorted(dataset.names) == sorted(members)
    assert_maps_back(dataset, members)
