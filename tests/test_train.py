"""The generic training loop with the image task: checkpoints, exact resume, EMA, data order."""

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from condlora.core.errors import CondloraError
from condlora.image.config import load_config
from condlora.image.task import image_trainer, train
from condlora.image.task import read_run_checkpoint as read_checkpoint
from condlora.train.checkpoint import CHECKPOINT_NAME, EMA
from condlora.train.loop import adamw, batch_indices, learning_rate

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


def test_ema_follows_reassigned_tensors_and_another_model():
    """The walked parameter lists are reused between updates, but a parameter replaced,
    data moved by `.to()` or another model object is seen at the next update."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    ema = EMA(model, decay=0.5, schedule="fixed")
    ema.update(model, step=1)
    model[1].weight = torch.nn.Parameter(torch.full((2, 2), 4.0))  # a new Parameter object
    model[0].bias.data = torch.full((2,), 2.0)  # new data behind the same object
    before = [p.clone() for p in ema.model.parameters()]
    ema.update(model, step=2)
    for e, old, p in zip(ema.model.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.5 * old + 0.5 * p)
    other = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    before = [p.clone() for p in ema.model.parameters()]
    ema.update(other, step=3)
    for e, old, p in zip(ema.model.parameters(), before, other.parameters(), strict=True):
        torch.testing.assert_close(e, 0.5 * old + 0.5 * p)
    with pytest.raises(CondloraError, match="not those of the copy"):
        ema.update(torch.nn.Linear(3, 2), step=4)


def test_ema_schedules_follow_the_originals():
    model = torch.nn.Linear(2, 2)
    fixed = EMA(model, decay=0.9999, schedule="fixed")  # improved-diffusion: one rate
    assert fixed.decay_at(1) == fixed.decay_at(10**6) == 0.9999
    edm = EMA(model, 0.0, schedule="edm", batch_size=512, halflife_kimg=500, rampup=0.05)
    for step in (1, 2, 100, 10_000, 100_000):
        # EDM's training loop: the EMA update of a step sees the images of the steps before
        nimg = (step - 1) * 512
        halflife = min(500 * 1000, nimg * 0.05)
        assert edm.decay_at(step) == pytest.approx(0.5 ** (512 / max(halflife, 1e-8)), abs=0)
    assert edm.decay_at(1) == 0.0  # the first update copies the weights
    assert edm.decay_at(100_000) == pytest.approx(0.5 ** (512 / 500_000))  # past the ramp-up
    no_ramp = EMA(model, 0.0, schedule="edm", batch_size=512, halflife_kimg=500, rampup=0)
    assert no_ramp.decay_at(1) == pytest.approx(0.5 ** (512 / 500_000))
    with pytest.raises(CondloraError, match="ema_schedule"):
        EMA(model, 0.9, schedule="cosine")


@pytest.mark.parametrize(
    ("config", "schedule"),
    [("cifar10-edm-cond-lora.yaml", "edm"), ("cifar10-iddpm-uncond-baseline.yaml", "fixed")],
)
def test_paper_configs_use_the_originals_ema(config, schedule):
    t = tiny(config, []).train
    assert t.ema_schedule == schedule
    if schedule == "edm":
        assert (t.ema_halflife_kimg, t.ema_rampup, t.nan_to_num_grads) == (500, 0.05, True)
    else:
        assert t.ema_decay == 0.9999


def test_adamw_is_fused_and_matches_the_update_written_out():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(5, 3))
    opt = adamw([param], lr=1e-2, weight_decay=0.1)
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4):
        assert opt.defaults["fused"]  # torch >= 2.4 fuses AdamW on the CPU
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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits-uclora.yaml", "digits-classlora.yaml"])
def test_resume_continues_exactly(tmp_path, tiny_overrides, name):
    cfg = tiny(name, tiny_overrides + ["train.max_steps=8"])
    train(cfg, tmp_path / "straight", progress=False)
    interrupted = image_trainer(cfg, tmp_path / "split")
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
    trainer = image_trainer(cfg, tmp_path)
    first = trainer.model.state_dict()
    first = {k: v.clone() for k, v in first.items()}
    trainer.run(progress=False)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step_0000005.png",
        "step_0000010.png",
    ]
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10]
    assert all(r["loss"] > 0 for r in lines)
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, first[k])]
    assert changed, "training did not change any weight"
    with safe_open(str(tmp_path / CHECKPOINT_NAME), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["name"] == "digits-baseline"
    assert (tmp_path / "config.yaml").is_file()


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(tmp_path, tiny_overrides):
    cfg = tiny("digits-baseline.yaml", tiny_overrides)
    with pytest.raises(CondloraError, match="no checkpoint"):
        image_trainer(cfg, tmp_path / "empty", resume=True)
    train(cfg, tmp_path / "run", max_steps=2, progress=False)
    with pytest.raises(CondloraError, match="--resume"):
        image_trainer(cfg, tmp_path / "run")


@pytest.mark.slow
def test_loss_falls_on_digits(tmp_path, tiny_overrides):
    cfg = tiny("digits-baseline.yaml", tiny_overrides + ["train.lr=3e-3", "train.log_every=20"])
    train(cfg, tmp_path, max_steps=80, progress=False)
    losses = [json.loads(s)["loss"] for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0], losses


def test_learning_rate_schedule(tiny_overrides):
    t = tiny("digits-baseline.yaml", tiny_overrides + ["train.max_steps=105", "train.lr=1.0"]).train
    assert learning_rate(t, 0) == 0.0  # warm-up over 5 steps, from 0
    assert learning_rate(t, 4) == pytest.approx(0.8)
    assert learning_rate(t, 5) == pytest.approx(1.0)
    assert learning_rate(t, 55) == pytest.approx(0.5)  # half-way through the cosine
    assert learning_rate(t, 104) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    t = tiny(
        "digits-baseline.yaml", tiny_overrides + ["train.lr_schedule=constant", "train.lr=1.0"]
    ).train
    assert learning_rate(t, 1000) == 1.0
    assert learning_rate(replace(t, warmup_steps=0), 0) == 1.0  # no warm-up: the peak at once


def test_warm_up_is_edms():
    """EDM's training loop: lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1), with
    cur_nimg the images seen before the step (CIFAR-10: batch 512, 10 Mimg ramp-up)."""
    t = load_config(CONFIGS / "cifar10-edm-cond-lora.yaml").train
    rampup_kimg = t.warmup_steps * t.batch_size / 1000  # 19531 steps of 512: 10 Mimg
    for step in [0, 1, 2, 1000, 19530, 19531, 19532, 100000]:
        cur_nimg = step * t.batch_size
        edm = t.lr * min(cur_nimg / max(rampup_kimg * 1000, 1e-8), 1)
        assert learning_rate(t, step) == pytest.approx(edm, rel=1e-12, abs=0), step


@pytest.mark.slow
def test_compile_option_compiles_the_loss_module(tmp_path, tiny_overrides):
    compiled = image_trainer(
        tiny("digits-baseline.yaml", [*tiny_overrides, "train.compile=true"]), tmp_path / "c"
    )
    plain = image_trainer(tiny("digits-baseline.yaml", tiny_overrides), tmp_path / "p")
    optimized = torch._dynamo.eval_frame.OptimizedModule
    assert isinstance(compiled.loss_fn, optimized) and not isinstance(plain.loss_fn, optimized)
    assert compiled.loss_fn._orig_mod.denoiser is compiled.model  # checkpoints: plain keys


@pytest.mark.slow
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
