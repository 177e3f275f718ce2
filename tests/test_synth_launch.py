"""A tiny synthesis config trained by two CPU processes under `accelerate launch`."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from condlora.synthesis.model import MODEL_FILE

from .conftest import REPO
from .synth_common import TINY, linear_collection


@pytest.mark.slow
def test_two_processes_train_a_tiny_synthesis_config(tmp_path):
    """`accelerate launch` with two CPU processes (gloo DDP) on `synth train --config`."""
    dataset = linear_collection(tmp_path / "ds.safetensors")[0]
    config = tmp_path / "tiny.yaml"
    data = {"kind": "synthesis", "name": "tiny", "dataset": str(dataset)}
    config.write_text(yaml.safe_dump(data))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    args = ["-m", "condlora.cli", "synth", "train", "--config", str(config)]
    args += ["--out", str(tmp_path / "m"), "--quiet", *TINY, "prior.cond_dropout=0"]
    result = subprocess.run(
        [*launch, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("vae", "prior"):
        records = [json.loads(s) for s in (tmp_path / "m" / stage / "metrics.jsonl").open()]
        assert [r["step"] for r in records] == [2, 4, 6]  # one writer: the main process
        assert all(r["processes"] == 2 and r["local_batch"] == 4 for r in records)  # 8 / 2
    assert (tmp_path / "m" / MODEL_FILE).is_file()
