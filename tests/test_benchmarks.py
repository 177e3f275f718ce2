"""Smoke runs of the benchmarks at tiny size, so they cannot rot: each prints its tables and
one JSON line with the ratios."""

import importlib
import json
import sys

import pytest

from .conftest import REPO


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
