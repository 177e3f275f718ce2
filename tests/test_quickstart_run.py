"""`condlora quickstart` end to end on a short budget: both models trained, scored, reported,
and learning digits well above chance."""

import re
import shutil

import pytest

from condlora.apps.quickstart import run_quickstart
from condlora.cli import main
from condlora.evaluation.evaluate import CLASSIFIER_FILE
from condlora.image.build import build_data
from condlora.image.config import load_config
from condlora.metrics import save_classifier, train_digits_classifier

from .conftest import CONFIGS

# A short recipe of the real digits nets (the tiny test nets learn no digits in seconds):
# 400 steps, warm-up 20, lr 4e-3, 8 Heun steps. Measured: 43-45% class accuracy for both
# models (chance: 10%), FD / real-to-real 1.5; about a minute on 2 cores.
SHORT = ["train.batch_size=32", "train.warmup_steps=20", "train.lr=4e-3"]
SHORT += ["diffusion.sample_steps=8"]


@pytest.fixture(scope="module")
def judge_file(tmp_path_factory):
    """A digits judge trained for 200 steps (the session's 15-step one reads digits poorly)."""
    path = tmp_path_factory.mktemp("judge") / CLASSIFIER_FILE
    (images, labels), _ = build_data(load_config(CONFIGS / "digits-baseline.yaml"))
    save_classifier(train_digits_classifier(images, labels, steps=200), path)
    return path


@pytest.mark.slow
def test_quickstart_end_to_end_learns_digits_well_above_chance(tmp_path, judge_file, capsys):
    out = tmp_path / "qs"
    out.mkdir()
    shutil.copy(judge_file, out / CLASSIFIER_FILE)  # the judge, as a first run caches it
    report = run_quickstart(out, steps=400, overrides=SHORT, num=100)
    text = report.read_text()
    rows = re.findall(r"^\| (baseline|uclora) \| ([\d,]+) \| ([\d,]+) \| 400 \| .*$", text, re.M)
    assert [r[0] for r in rows] == ["baseline", "uclora"]
    assert rows[0][2] == "0" and int(rows[1][2].replace(",", "")) > 0  # LoRA parameters
    for name in ("baseline", "uclora"):
        assert (out / f"{name}.png").is_file() and f"![{name}]({name}.png)" in text
        assert (out / name / "checkpoint.safetensors").is_file()
    assert "100 class-conditional samples per model (10 per class)" in text
    assert "commit" in text.splitlines()[2]  # the provenance stamp under the title
    floor = float(re.search(r"is \*\*([\d.]+)\*\*", text).group(1))
    for line in text.splitlines():
        if line.startswith(("| baseline |", "| uclora |")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            accuracy, fd, ratio = float(cells[5].rstrip("%")), float(cells[6]), float(cells[7])
            assert accuracy >= 30, line  # chance is 10%
            assert 0 < ratio < 3, line
            # the ratio is FD over the floor; all three are printed rounded to 0.005
            assert abs(ratio * floor - fd) <= 0.005 * (ratio + floor + 1), line

    # A rerun reuses both runs (train time 0); other steps in the same folder are refused.
    assert "| 0 |" in run_quickstart(out, steps=400, overrides=SHORT, num=100).read_text()
    assert main(["quickstart", "--out", str(out), "--steps", "7"]) == 2
    assert "holds a run of a different config" in capsys.readouterr().err
