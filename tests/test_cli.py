"""The `condlora` command: train / resume / sample / info, and one-line errors."""

import subprocess
import sys

import pytest
import torch
from PIL import Image

from condlora.cli import main
from condlora.image.config import load_config
from condlora.image.task import read_run_checkpoint as read_checkpoint
from condlora.train.checkpoint import CHECKPOINT_NAME

from .conftest import CONFIGS, REPO


@pytest.mark.slow
def test_train_resume_sample(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    args = ["train", "--config", str(CONFIGS / "digits-uclora.yaml"), "--out", str(run)]
    tiny_overrides = [*tiny_overrides, "train.label_dropout=0.1"]  # for --guidance below
    assert main(args + ["--max-steps", "30", "--quiet", *tiny_overrides]) == 0
    assert read_checkpoint(run / CHECKPOINT_NAME)[1] == 30
    assert (run / "samples" / "step_0000030.png").is_file()

    assert main(args + ["--max-steps", "40", "--resume", "--quiet", *tiny_overrides]) == 0
    assert read_checkpoint(run / CHECKPOINT_NAME)[1] == 40

    out = tmp_path / "grid.png"
    assert (
        main(["sample", "--run", str(run), "--num", "12", "--out", str(out), "--label", "3"]) == 0
    )
    guided = tmp_path / "guided.png"
    assert (
        main(["sample", "--run", str(run), "--num", "4", "--out", str(guided), "--guidance", "2"])
        == 0
    )
    assert guided.is_file()
    width, height = Image.open(out).size
    # 12 images of 16 px in rows of 10 with 1-px borders, drawn 4x larger: 10 columns, 2 rows.
    assert (width, height) == (4 * (10 * 17 + 1), 4 * (2 * 17 + 1))
    assert "wrote 12 samples" in capsys.readouterr().out


# The README's quickstart table: independent numbers, not the CLI's own sum.
README_COUNTS = {"digits-baseline": (1_206_532, 0), "digits-uclora": (1_350_212, 143_680)}


@pytest.mark.parametrize("name", ["digits-baseline", "digits-uclora", "digits-onlylora"])
def test_info_prints_the_parameter_counts(name, capsys):
    assert main(["info", "--config", str(CONFIGS / f"{name}.yaml")]) == 0
    lines = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    if name in README_COUNTS:
        total, lora = README_COUNTS[name]
        assert (int(lines["parameters"]), int(lines["lora parameters"])) == (total, lora)
        assert f"{total:,}" in (REPO / "README.md").read_text()
    else:  # only LoRA: the UC-LoRA net without the blocks' scale-and-shift layers
        assert int(lines["lora parameters"]) == README_COUNTS["digits-uclora"][1]
        assert int(lines["parameters"]) < README_COUNTS["digits-uclora"][0]
    if name == "digits-baseline":
        assert int(lines["conditioning parameters"]) > 0


def run_cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "condlora.cli", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["net.model_chanels=8"], "valid keys"),
        (["lora.method=magic"], "magic"),
        (["lora.targets=[nothing_here]"], "nothing_here"),
    ],
)
@pytest.mark.slow
def test_user_mistakes_get_one_line_and_exit_2(extra, fragment):
    result = run_cli("info", "--config", "configs/digits-uclora.yaml", *extra)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_missing_config_and_run_folder(tmp_path, capsys):
    assert main(["info", "--config", str(tmp_path / "none.yaml")]) == 2
    assert main(["sample", "--run", str(tmp_path), "--num", "4", "--out", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "config file not found" in err and "checkpoint.safetensors" in err


def test_lora_only_without_a_class_path_is_refused(capsys):
    args = ["info", "--config", str(CONFIGS / "digits-onlylora.yaml"), "lora.method=time"]
    assert main(args) == 2
    assert "does not see it" in capsys.readouterr().err


def test_sampled_labels_follow_the_request(tmp_path, tiny_overrides):
    from condlora.image.generate import labels_for

    cfg = load_config(CONFIGS / "digits-baseline.yaml", tiny_overrides)
    assert labels_for(cfg, 12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert torch.equal(labels_for(cfg, 3, label=7), torch.tensor([7, 7, 7]))


def test_overrides_may_follow_options(capsys):
    args = ["info", "--config", str(CONFIGS / "digits-baseline.yaml")]
    assert main([*args, "net.model_channels=8"]) == 0
    first = capsys.readouterr().out
    assert (
        main(["info", "net.model_channels=8", "--config", str(CONFIGS / "digits-baseline.yaml")])
        == 0
    )
    assert capsys.readouterr().out == first
    with pytest.raises(SystemExit):
        main([*args, "--bogus"])
    with pytest.raises(SystemExit):
        main(["sample", "--run", "x", "--num", "1", "--out", "y.png", "train.lr=1"])
