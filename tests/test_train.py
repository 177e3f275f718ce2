"""Training loop: checkpoints, exact resume, EMA, data order."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from condlora.conditioning.config import load_config
from condlora.core.errors import CondloraError
from condlora.train.checkpoint import CHECKPOINT_NAME, read_checkpoint
from condlora.train.ema import EMA
from condlora.train.trainer import Trainer, adamw, batch_indices, train

from .conftest import CONFIGS


def tiny(name, overrides):
    return load_config(CONFIGS / name, overrides)


def test_batches_cover_each_epoch_once_and_are_deterministic():
    n, batch = 50, 16
    epoch = torch.cat([batch_indices(k, n, batch, seed=3) for k in range(3)])
    assert len(set(epoch.tolist())) == 48  # 3 full batches, no repeats within an epoch
    assert torch.equal(batch_indices(4, n, batch, 3), batch_indices(4, n, batch, 3))
    assert not torch.equal(batch_indices(3, n, batch, 3), batch_indices(0, n, batch, 3))
    with pytest.raises(CondloraError, match="larger than the data set"):
        batch_indices(0, 10, 16, 0)


def test_ema_matches_plain_formula():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=100)  # ramp (101/110) > 0.9, so decay is 0.9
    expected = 0.9 * before + 0.1 * model.weight
    assert torch.allclose(ema.model.weight, expected, atol=1e-6)
    assert ema.decay_at(0) == pytest.approx(0.1)


def test_adamw_is_fused_and_matches_the_update_written_out():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(5, 3))
    opt = adamw([param], lr=1e-2, weight_decay=0.1)
    assert opt.defaults["fused"]  # this torch build fuses AdamW on the CPU
    p, m, v = param.detach().clone(), torch.zeros(5, 3), torch.zeros(5, 3)
    b1, b2, eps, lr, wd = 0.9, 0.999, 1e-8, 1e-2, 0.1
    for step in range(1, 4):
        grad = torch.randn(5, 3)
        param.grad = grad.clone()
        opt.step()
        # AdamW (Loshchilov & Hutter): decoupled decay, then the bias-corrected Adam step
        m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad**2
        p = p * (1 - lr * wd)
        p = p - lr * (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
    assert torch.allclose(param.detach(), p, atol=1e-6)


def test_adamw_falls_back_where_fused_is_refused(monkeypatch):
    class OldAdamW(torch.optim.AdamW):  # as torch < 2.4 answers fused=True for CPU tensors
        def __init__(self, params, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires ... supported devices: ['cuda']")
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", OldAdamW)
    opt = adamw([torch.nn.Parameter(torch.ones(2))], lr=1e-3, weight_decay=0.0)
    assert isinstance(opt, OldAdamW) and not opt.defaults["fused"]


@pytest.mark.parametrize("name", ["digits-uclora.yaml", "digits-classlora.yaml"])
def test_resume_continues_exactly(tmp_path, tiny_overrides, name):
    cfg = tiny(name, tiny_overrides + ["train.max_steps=8"])
    train(cfg, tmp_path / "straight", progress=False)
    interrupted = Trainer(cfg, tmp_path / "split")
    for _ in range(4):  # a run that stops half-way (crash after a checkpoint)
        interrupted.train_step()
    interrupted.save()
    train(cfg, tmp_path / "split", resume=True, progress=False)
    _, step_a, a = read_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    _, step_b, b = read_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)
    assert step_a == step_b == 8
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert a["optim"]["param_groups"] == b["optim"]["param_groups"]


def test_run_folder_contents(tmp_path, tiny_overrides):
    cfg = tiny(
        "digits-baseline.yaml", tiny_overrides + ["train.sample_every=5", "train.max_steps=10"]
    )
    trainer = Trainer(cfg, tmp_path)
    first = trainer.denoiser.state_dict()
    first = {k: v.clone() for k, v in first.items()}
    trainer.run(progress=False)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step_0000005.png",
        "step_0000010.png",
    ]
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10]
    assert all(r["loss"] > 0 for r in lines)
    changed = [k for k, v in trainer.denoiser.state_dict().items() if not torch.equal(v, first[k])]
    assert changed, "training did not change any weight"
    with safe_open(str(tmp_path / CHECKPOINT_NAME), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["name"] == "digits-baseline"
    assert (tmp_path / "config.yaml").is_file()


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(tmp_path, tiny_overrides):
    cfg = tiny("digits-baseline.yaml", tiny_overrides)
    with pytest.raises(CondloraError, match="no checkpoint"):
        Trainer(cfg, tmp_path / "empty", resume=True)
    train(cfg, tmp_path / "run", max_steps=2, progress=False)
    with pytest.raises(CondloraError, match="--resume"):
        Trainer(cfg, tmp_path / "run")


def test_loss_falls_on_digits(tmp_path, tiny_overrides):
    cfg = tiny("digits-baseline.yaml", tiny_overrides + ["train.lr=3e-3", "train.log_every=20"])
    train(cfg, tmp_path, max_steps=80, progress=False)
    losses = [json.loads(s)["loss"] for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0], losses


def test_learning_rate_schedule(tiny_overrides):
    cfg = tiny("digits-baseline.yaml", tiny_overrides + ["train.max_steps=105", "train.lr=1.0"])
    trainer = Trainer.__new__(Trainer)  # lr_at only reads the config
    trainer.cfg = cfg
    assert trainer.lr_at(0) == pytest.approx(0.2)  # warm-up over 5 steps
    assert trainer.lr_at(4) == pytest.approx(1.0)
    assert trainer.lr_at(55) == pytest.approx(0.5)  # half-way through the cosine
    assert trainer.lr_at(104) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    trainer.cfg = tiny(
        "digits-baseline.yaml", tiny_overrides + ["train.lr_schedule=constant", "train.lr=1.0"]
    )
    assert trainer.lr_at(1000) == 1.0


def test_compile_option_compiles_the_loss_module(tmp_path, tiny_overrides):
    compiled = Trainer(
        tiny("digits-baseline.yaml", [*tiny_overrides, "train.compile=true"]), tmp_path / "c"
    )
    plain = Trainer(tiny("digits-baseline.yaml", tiny_overrides), tmp_path / "p")
    optimized = torch._dynamo.eval_frame.OptimizedModule
    assert isinstance(compiled.loss_fn, optimized) and not isinstance(plain.loss_fn, optimized)
    assert compiled.loss_fn._orig_mod.denoiser is compiled.denoiser  # checkpoints: plain keys


def test_two_processes_split_the_global_batch(tmp_path, tiny_overrides):
    """Two CPU processes under accelerate (gloo DDP): one checkpoint, half the batch each.

    accelerate 1.15 runs `launch --cpu --num_processes 2` as ONE process (several CPU
    processes need mpirun); its torchrun launcher with ACCELERATE_USE_CPU starts two.
    """
    import os
    import subprocess
    import sys

    from .conftest import REPO

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    train_args = ["-m", "condlora.cli", "train", "--config", str(CONFIGS / "digits-uclora.yaml")]
    train_args += ["--out", str(tmp_path), "--max-steps", "4", "--quiet", *tiny_overrides]
    result = subprocess.run(
        [*launch, *train_args, "train.log_every=2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_checkpoint(tmp_path / CHECKPOINT_NAME)[1] == 4
    records = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]  # one writer: the main process
    assert all(r["processes"] == 2 and r["local_batch"] == 8 for r in records)  # 16 / 2
