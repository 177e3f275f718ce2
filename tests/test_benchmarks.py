"""Smoke runs of the benchmarks at tiny size, so they cannot rot: each prints its tables and
one JSON line with the ratios."""

import importlib
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from condlora.evaluation.evaluate import CLASSIFIER_FILE

from .conftest import REPO, TINY


def run_benchmark(name: str, argv: list[str], capsys) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        module = importlib.import_module(name)
        module.main(argv)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("|")  # a table, then the JSON line
    return json.loads(lines[-1])


@pytest.mark.slow
def test_overhead_smoke(capsys, one_thread):
    result = run_benchmark("overhead", ["--smoke"], capsys)
    assert result["benchmark"] == "overhead" and result["smoke"]
    assert set(result["results"]) == {"digits", "edm", "iddpm"}
    for net in result["results"].values():
        methods = net["methods"]
        assert methods["baseline"]["train_time_ratio"] == 1.0
        for row in methods.values():
            for key in ("train_time_ratio", "train_memory_ratio", "sampling_time_ratio"):
                assert row[key] > 0
    digits = result["results"]["digits"]["methods"]
    assert set(digits) == {"baseline", "time", "time+class", "uc", "uc, only LoRA"}
    assert digits["uc"]["parameters"] > digits["baseline"]["parameters"]
    uc = digits["uc"]
    assert uc["param_ratio"] == uc["parameters"] / digits["baseline"]["parameters"]


def test_vs_diffusers_smoke(capsys, one_thread):
    pytest.importorskip("diffusers")
    result = run_benchmark("vs_diffusers", ["--smoke"], capsys)
    assert result["benchmark"] == "vs_diffusers"
    assert len(result["results"]) == 5
    for row in result["results"].values():
        assert row["train_time_ratio"] > 0 and row["sample_time_ratio"] > 0


def test_cpu_speed_smoke(capsys, one_thread):
    # torch.compile is left out here: compiling takes minutes on a small CPU
    variants = "fp32,bf16,bf16-implicit"
    result = run_benchmark("cpu_speed", ["--smoke", "--variants", variants], capsys)
    assert result["benchmark"] == "cpu_speed"
    assert set(result["results"]) == {
        f"{m} {v}" for m in ("baseline", "uclora") for v in variants.split(",")
    }
    assert result["results"]["uclora fp32"]["train_time_ratio"] == 1.0


def test_cifar10_gpu_smoke(capsys, one_thread):
    result = run_benchmark("cifar10_gpu", ["--smoke", "--cond", "cond"], capsys)
    assert result["benchmark"] == "cifar10_gpu" and result["smoke"]
    assert set(result["results"]) == {"baseline", "lora", "onlylora"}
    rows = result["results"]
    assert rows["baseline"]["train_ratio"] == 1.0
    assert rows["lora"]["parameters"] > rows["onlylora"]["parameters"] > 0
    assert all(r["train_ips"] > 0 and r["sample_ips"] > 0 for r in rows.values())


def test_synthesis_scale_smoke(capsys, one_thread):
    result = run_benchmark("synthesis_scale", ["--smoke"], capsys)
    assert result["benchmark"] == "synthesis_scale" and result["smoke"]
    parts = result["results"]
    assert {"VAE train step", "prior train step"} <= set(parts)
    assert all(p["seconds"] > 0 for p in parts.values())


def test_synthesis_scale_collection_smoke(tmp_path, capsys, one_thread):
    """--collection at a tiny size: the statistics are numpy's over the file, the batches
    are rows of the file (read by a loader worker as in the main process), figures printed."""
    from safetensors.numpy import load_file

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        scale = importlib.import_module("synthesis_scale")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    path = tmp_path / "collection.safetensors"
    argv = ["--collection", "--smoke", "--rows", "300", "--dim", "96", "--train-steps", "2"]
    argv += ["--memory-rows", "64", "--file", str(path)]
    result = scale.run_collection(scale.parse_args([*argv, "--keep"]))
    x = load_file(path)["vectors"]
    assert x.dtype == np.float16 and x.shape == (300, 96)
    want = x.astype(np.float64)
    assert np.allclose(result["stats"]["mean"], want.mean(0), rtol=1e-9, atol=1e-12)
    assert np.allclose(result["stats"]["std"], want.std(0), rtol=1e-9, atol=1e-12)
    start, rows, dim = scale.open_collection(path)
    from_file = scale.RowBatches(path, start, rows, dim, batch=5, count=3, seed=7)
    in_memory = scale.RowBatches(path, start, rows, dim, 5, 3, 7, memory=x)
    by_worker = list(scale.batches(from_file, workers=1))
    for k in range(3):
        got = from_file[k][0]
        assert torch.equal(got, in_memory[k][0]) and torch.equal(got, by_worker[k][0])
        matches = (torch.from_numpy(want).float()[None] == got[:, None]).all(-1)
        assert (matches.sum(1) >= 1).all()  # every batch row is a row of the file
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    record = json.loads(lines[-1])
    assert record["benchmark"] == "synthesis_scale_collection" and record["rows"] == 300
    for part in ("vae", "prior"):
        assert all(record["results"][part][s]["steps_per_s"] > 0 for s in ("file", "memory"))
    assert {"collect", "train"} <= set(record["results"]["memory"])
    assert "peak RSS of the main process" in out and "file: " in out
    scale.run_collection(scale.parse_args(argv))  # without --keep: the file is deleted
    assert not path.exists()


def test_synth_demo_zoo_smoke(tiny_demo, tmp_path, capsys, one_thread):
    folder = tiny_demo[0]
    argv = ["--smoke", "--subjects", "2", "--per-class", "1", "--base", str(folder / "base")]
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        importlib.import_module("synth_demo_zoo").main(
            [*argv, "--cache", str(tmp_path / "cache"), "--set", "steps=4"]
            + ["--set", "targets=qkv,conv1", "--set", "average_last=0.5", "--time-steps", "2"]
        )
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = capsys.readouterr().out
    for row in ("fine-tuned: class accuracy", "no LoRA: class accuracy", "real styled digits"):
        assert row in out
    assert "zoo cost: " in out and "s per step of 4 subjects" in out  # tiny(): 4 per batch
    assert "fine-tuning: " in out and "['steps=4', 'targets=qkv,conv1', 'average_last=0.5']" in out
    from condlora.apps.synthesis_demo.config import tiny
    from condlora.image.task import load_run

    layers = [
        m
        for n, m in load_run(folder / "base")[1].net.net.named_modules()
        if n.endswith(("qkv", "conv1"))
    ]
    # r (in k k + out) numbers per layer: the 3x3 conv1 layers count their kernels
    count = sum(tiny().rank * (m.weight[0].numel() + m.weight.shape[0]) for m in layers)
    assert f"{count:,} numbers per LoRA" in out


def test_every_benchmark_has_a_smoke_test():
    here = (REPO / "tests" / "test_benchmarks.py").read_text()
    scripts = {p.stem for p in (REPO / "benchmarks").glob("*.py")} - {"timing"}
    untested = {s for s in scripts if f'"{s}"' not in here}
    assert not untested, untested


def test_quickstart_sweep_smoke(tmp_path, capsys, one_thread, classifier_file):
    shutil.copy(classifier_file, tmp_path / CLASSIFIER_FILE)  # the judge, as cached
    argv = ["--config", "digits-baseline.yaml", "--out", str(tmp_path / "run")]
    argv += ["--cache", str(tmp_path), "--num", "20", "--sample-steps", "2,3"]
    argv += [*TINY, "train.max_steps=2"]
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        importlib.import_module("quickstart_sweep").main(argv)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["sample_steps"] for r in records] == [2, 3]
    for r in records:
        assert r["steps"] == 2 and 0 <= r["class_accuracy"] <= 1 and r["floor"] > 0
        # all three are printed rounded to 0.001
        assert r["fd_ratio"] == pytest.approx(r["fd"] / r["floor"], rel=0.002 / r["floor"])
        assert r["commit"] and r["torch"]


def test_every_benchmark_stamps_its_provenance(capsys, one_thread):
    result = run_benchmark("synthesis_scale", ["--smoke"], capsys)
    for key in ("commit", "date", "cpu", "threads", "torch"):
        assert result[key], key


def test_merge_threshold_smoke(capsys, one_thread):
    result = run_benchmark("merge_threshold", ["--smoke"], capsys)
    assert result["benchmark"] == "merge_threshold" and result["smoke"]
    cells = result["results"]["cells"]
    assert [c["positions"] for c in cells] == [1, 64]
    for c in cells:
        assert c["merged"] > 0 and c["lowrank"] > 0
        assert c["faster"] == ("merged" if c["merged"] <= c["lowrank"] else "low-rank")
    assert set(result["results"]["agreement"]) == {"0", "12500", "25000", "50000", "100000"}


def test_lora_call_cost_smoke(capsys, one_thread):
    result = run_benchmark("lora_call_cost", ["--smoke", "--batch", "1,2"], capsys)
    assert result["benchmark"] == "lora_call_cost" and result["smoke"]
    assert set(result["results"]) == {"1", "2"}
    for rows in result["results"].values():
        assert set(rows) == {"plain", "time", "time+class", "uc"}
        assert rows["plain"]["lora_ms"] == 0.0  # the plain net against itself
        assert all(r["p10_ms"] > 0 and r["median_ms"] >= r["p10_ms"] for r in rows.values())


@pytest.mark.slow
def test_schedule_demo_smoke(capsys, one_thread, tmp_path):
    argv = ["--smoke", "--demo", str(tmp_path / "demo"), "--out", str(tmp_path / "out")]
    argv += ["--loras", "2", "--val", "1", "--seeds", "0,1", "--weights", "0,1"]
    # no fitting steps: every learned table is all ones, the static LoRA at strength 1
    argv += ["--steps", "0", *TINY, "train.max_steps=2"]
    result = run_benchmark("schedule_demo", argv, capsys)
    assert result["benchmark"] == "schedule_demo" and result["smoke"]
    runs = json.loads((tmp_path / "out" / "runs.json").read_text())
    assert len(runs) == 2 * 1 + 2 * 2  # the validation LoRA per weight, then 2 LoRAs x 2 seeds
    for record in runs.values():
        assert all(v == 1.0 for row in record["table"] for v in row)
        one = record["constant"]["1.0"]
        assert record["learned"][0] == pytest.approx(one[0], abs=1e-4)
        assert record["learned"][1] == one[1]
        assert set(record["constant"]) == {"0.0", "0.2", "0.4", "0.6", "0.8", "1.0", "1.2"}
    table = (tmp_path / "out" / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| strength")]
    assert len(rows) == 7 and "| learned schedule (weight 0)" in table
    assert (tmp_path / "out" / "tradeoff.png").stat().st_size > 0
    assert result["results"]["gain_per_seed"] == pytest.approx([0.0, 0.0], abs=0.01)
    again = run_benchmark("schedule_demo", argv, capsys)  # every fit read back from runs.json
    assert again["results"]["fits_reused"] == 6
    assert again["results"]["table"] == result["results"]["table"]
