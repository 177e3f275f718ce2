"""Crash safety: SIGKILL a training process while it writes a checkpoint every step.

After every kill the newest checkpoint loads; the run resumed to the end is bit-identical to
an uninterrupted one, and its metrics log holds each step once. (The SIGTERM test, which saves
on the way out, is in test_train_loop.py.)
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from condlora.image.task import read_run_checkpoint
from condlora.train.checkpoint import CHECKPOINT_NAME, checkpoint_step

from .conftest import CONFIGS, REPO, TINY

STEPS = 40
KILLS = 3


def command(out, *extra):
    args = [sys.executable, "-m", "condlora.cli", "train", "--config"]
    args += [str(CONFIGS / "digits-baseline.yaml"), "--out", str(out), "--quiet", *extra]
    return [*args, *TINY, "train.ckpt_every=1", "train.log_every=1", f"train.max_steps={STEPS}"]


def start(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command(out, *extra), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def saved_step(out):
    path = out / CHECKPOINT_NAME
    return checkpoint_step(path) if path.is_file() else 0


def kill_after_progress(proc, out, at_least, rng):
    """SIGKILL once the checkpoint reaches `at_least`, a random moment into a later step."""
    deadline = time.time() + 300
    while saved_step(out) < at_least and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.15))  # lands before, during or after a checkpoint write
    assert proc.poll() is None, "the run ended before it could be killed: raise STEPS"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_then_resume_is_bit_identical(tmp_path):
    rng = random.Random(0)
    straight = start(tmp_path / "straight")
    killed = tmp_path / "killed"
    steps_seen = []
    proc = start(killed)
    for _ in range(KILLS):
        kill_after_progress(proc, killed, saved_step(killed) + 2, rng)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-500:]
        _, step, parts = read_run_checkpoint(killed / CHECKPOINT_NAME)  # the newest one loads
        assert 0 < step < STEPS and parts["ema"], step
        steps_seen.append(step)
        proc = start(killed, "--resume")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-500:]
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err.decode()[-500:]
    assert steps_seen == sorted(steps_seen), steps_seen  # each kill came later in the run

    _, step_a, a = read_run_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    _, step_b, b = read_run_checkpoint(killed / CHECKPOINT_NAME)
    assert step_a == step_b == STEPS
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))
