"""`condlora quickstart` end to end on a tiny budget: both models trained, scored, reported."""

import re
import shutil

import pytest

from condlora.apps.quickstart import run_quickstart
from condlora.cli import main
from condlora.evaluation.evaluate import CLASSIFIER_FILE

from .conftest import TINY


@pytest.mark.slow
def test_quickstart_end_to_end_on_a_tiny_budget(tmp_path, classifier_file, capsys):
    out = tmp_path / "qs"
    out.mkdir()
    shutil.copy(classifier_file, out / CLASSIFIER_FILE)  # the judge, as a first run caches it
    report = run_quickstart(out, steps=6, overrides=TINY, num=40)
    text = report.read_text()
    rows = re.findall(r"^\| (baseline|uclora) \| ([\d,]+) \| ([\d,]+) \| 6 \| .*$", text, re.M)
    assert [r[0] for r in rows] == ["baseline", "uclora"]
    assert rows[0][2] == "0" and int(rows[1][2].replace(",", "")) > 0  # LoRA parameters
    for name in ("baseline", "uclora"):
        assert (out / f"{name}.png").is_file() and f"![{name}]({name}.png)" in text
        assert (out / name / "checkpoint.safetensors").is_file()
    assert "40 class-conditional samples per model (4 per class)" in text
    floor = float(re.search(r"is \*\*([\d.]+)\*\*", text).group(1))
    for line in text.splitlines():
        if line.startswith(("| baseline |", "| uclora |")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            accuracy, fd, ratio = float(cells[5].rstrip("%")), float(cells[6]), float(cells[7])
            assert 0 <= accuracy <= 100 and fd > 0
            # the ratio is FD over the floor; all three are printed rounded to 0.005
            assert abs(ratio * floor - fd) <= 0.005 * (ratio + floor + 1), line

    # A rerun reuses both runs (train time 0); other steps in the same folder are refused.
    assert "| 0 |" in run_quickstart(out, steps=6, overrides=TINY, num=40).read_text()
    assert main(["quickstart", "--out", str(out), "--steps", "7"]) == 2
    assert "holds a run of a different config" in capsys.readouterr().err
