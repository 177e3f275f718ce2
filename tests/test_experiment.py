"""`condlora experiment`: a tiny grid end to end, reuse on rerun, the shipped paper grid."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

import condlora.apps.experiment.runner as experiment
import condlora.apps.experiment.spec as experiment_file
import condlora.metrics.reference as reference
from condlora.apps.experiment.runner import RUN_FILE
from condlora.cli import main
from condlora.core.files import read_jsonl
from condlora.core.reporting import mean_std
from condlora.evaluation.evaluate import CLASSIFIER_FILE
from condlora.image.build import build_denoiser
from condlora.train.checkpoint import checkpoint_step

from .conftest import CONFIGS, REPO, TINY


def write_grid(folder, steps=6):
    spec = {
        "name": "tiny",
        "steps": steps,
        "seeds": [0, 1],
        "overrides": TINY,
        "eval": {"num": 24, "every": 3, "curve_num": 12},
        "variants": [
            {"name": "base", "config": str(CONFIGS / "digits-baseline.yaml")},
            {"name": "tc", "config": "configs/digits-classlora.yaml", "overrides": []},
        ],
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_tiny_grid_report_and_rerun(tmp_path, classifier_file, monkeypatch, capsys):
    monkeypatch.setattr(reference, "FLOOR_SPLITS", 2)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(classifier_file, out / CLASSIFIER_FILE)
    grid = write_grid(tmp_path)
    assert main(["experiment", str(grid), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "[4/4] tc seed 1" in printed and "FD" in printed

    for variant in ("base", "tc"):
        for seed in (0, 1):
            run = out / variant / f"seed-{seed}"
            metrics = json.loads((run / "metrics.json").read_text())
            assert (metrics["step"], metrics["num_samples"]) == (6, 24)
            assert [p["step"] for p in read_jsonl(run / "curve.jsonl")] == [3, 6]
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    fds = [r["metrics"]["fd"] for r in results[1]["runs"]]
    mean, std = mean_std(fds)
    assert f"{mean:.3f} ± {std:.3f}" in report  # the table's FD of variant tc
    assert "| base |" in report and "| tc |" in report
    assert "every variant with `net.model_channels=8` `net.channel_mult=[1, 2]`" in report
    assert "TimeLoRA: cosine similarity" in report and "ClassLoRA: tc" in report
    for png in ("loss.png", "fd.png", "grids/base.png", "grids/tc.png", "grids/tc-class-mix.png"):
        assert f"({png})" in report
        assert Image.open(out / png).size[0] > 100
    assert not (out / "grids" / "base-class-scale.png").exists()  # no ClassLoRA in base

    # A rerun trains nothing and evaluates nothing: every run is finished.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was redone")

    monkeypatch.setattr(experiment.Trainer, "run", refuse)
    monkeypatch.setattr(experiment, "evaluate_run", refuse)
    assert main(["experiment", str(grid), "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.count("reused") == 8  # training and evaluation, 4 runs

    # The same folder with other steps is another experiment: refused in one line.
    assert main(["experiment", str(grid), "--out", str(out), "--steps", "8"]) == 2
    assert "different config" in capsys.readouterr().err


def test_experiment_file_mistakes_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps: 5\nvariants: [{name: a, config: nowhere.yaml}]\n")
    assert main(["experiment", str(bad)]) == 2
    bad.write_text("name: x\nsteps: 5\nvariants: [{name: a, confg: b.yaml}]\n")
    assert main(["experiment", str(bad)]) == 2
    assert main(["experiment", str(tmp_path / "missing.yaml")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    assert "nowhere.yaml" in lines[0] and "did you mean 'config'" in lines[1]
    assert "not found" in lines[2]


def test_shipped_paper_grid_builds():
    exp, variants = experiment_file.load_experiment(REPO / "configs/experiments/digits-paper.yaml")
    assert exp.seeds == [0, 1, 2] and len(variants) == 8
    modes = {}
    for v in variants:
        cfg = experiment_file.run_config(exp, v, seed=1)
        assert (cfg.train.max_steps, cfg.train.seed) == (exp.steps, 1)
        build_denoiser(cfg)  # every variant passes the config checks
        modes[v.name] = (cfg.net.cond_mode, cfg.lora.method, cfg.net.class_conditional)
    assert modes["timelora-only"] == ("lora_only", "time", False)
    assert modes["classlora-only"] == ("lora_only", "time+class", True)
    assert modes["uclora-with"] == ("both", "uc", True)
    assert modes["baseline"] == ("scale_shift", "none", True)


def one_run_grid(tmp_path, classifier_file, monkeypatch):
    """(out folder with the cached judge, a grid of one variant and one seed)."""
    monkeypatch.setattr(reference, "FLOOR_SPLITS", 2)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(classifier_file, out / CLASSIFIER_FILE)
    spec = yaml.safe_load(write_grid(tmp_path).read_text())
    spec |= {"seeds": [0], "variants": spec["variants"][1:]}
    grid = tmp_path / "one.yaml"
    grid.write_text(yaml.safe_dump(spec))
    return out, grid


@pytest.mark.slow
def test_a_stopped_run_resumes_where_it_stopped(tmp_path, classifier_file, monkeypatch):
    out, grid = one_run_grid(tmp_path, classifier_file, monkeypatch)
    step = experiment.Trainer.train_step
    stopped = []

    def stop_at_4(self):
        result = step(self)
        if self.step == 4 and not stopped:
            stopped.append(self.step)
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(experiment.Trainer, "train_step", stop_at_4)
    assert main(["experiment", str(grid), "--out", str(out), "--quiet"]) == 130
    run = out / "tc" / "seed-0"
    assert checkpoint_step(run / "checkpoint.safetensors") == 4  # Ctrl-C saved it
    assert not (run / "metrics.json").exists()
    assert main(["experiment", str(grid), "--out", str(out), "--quiet"]) == 0
    assert checkpoint_step(run / "checkpoint.safetensors") == 6
    assert [p["step"] for p in read_jsonl(run / "curve.jsonl")] == [3, 6]
    assert json.loads((run / "metrics.json").read_text())["step"] == 6


@pytest.mark.slow
def test_a_kill_while_writing_run_records_then_a_rerun_finishes(
    tmp_path, classifier_file, monkeypatch, capsys
):
    """A kill inside a record's write leaves the old file (atomic writes); records damaged
    by other means are named, made again, and the rerun runs to the end."""
    out, grid = one_run_grid(tmp_path, classifier_file, monkeypatch)
    real_write_text = Path.write_text

    def killed_mid_write(self, text, *args, **kwargs):  # half the bytes, then the kill
        if self.name == "metrics.json.tmp":
            real_write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", killed_mid_write)
    assert main(["experiment", str(grid), "--out", str(out), "--quiet"]) == 130
    run = out / "tc" / "seed-0"
    assert not (run / "metrics.json").exists() and not (run / "metrics.json.tmp").exists()
    monkeypatch.setattr(Path, "write_text", real_write_text)
    assert main(["experiment", str(grid), "--out", str(out), "--quiet"]) == 0

    record = json.loads((run / RUN_FILE).read_text())
    (run / RUN_FILE).write_text(json.dumps(record)[:10])  # as an in-place write killed
    (run / "metrics.json").write_text('{"step": 6, "fd"')
    capsys.readouterr()
    assert main(["experiment", str(grid), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"{RUN_FILE} is damaged" in err and "metrics.json is damaged" in err
    assert json.loads((run / "metrics.json").read_text())["step"] == 6
    assert json.loads((run / RUN_FILE).read_text())["variant"] == "tc"
    assert (out / "report.md").is_file()
