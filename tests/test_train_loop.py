"""The generic loop on a toy non-image task, and the loop's guards: resume, NaN, SIGTERM, logs."""

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from condlora.cli import main
from condlora.core.errors import CondloraError
from condlora.image.build import build_denoiser
from condlora.image.config import Config, load_config
from condlora.image.task import IMAGE_KIND, image_trainer, load_run, read_run_checkpoint, train
from condlora.train.checkpoint import CHECKPOINT_NAME, EMA_NAME, read_checkpoint, read_ema_model
from condlora.train.config import TrainConfig
from condlora.train.loop import Trainer, TrainingDiverged, TrainTask, batch_indices

from .conftest import CONFIGS, REPO, TINY, assert_same_function


@dataclass
class ToyConfig:
    dim: int = 6  # vector length
    latent: int = 2  # code length
    train: TrainConfig = field(default_factory=TrainConfig)


class ToyVAE(nn.Module):
    """A linear VAE: the smallest model with a sampled (seeded) loss."""

    def __init__(self, dim, latent):
        super().__init__()
        self.enc, self.dec = nn.Linear(dim, 2 * latent), nn.Linear(latent, dim)
        self.sample = True  # False: z = mean (a deterministic loss)

    def forward(self, x):
        mean, logvar = self.enc(x).chunk(2, dim=1)
        noise = torch.randn_like(mean) if self.sample else 0  # the step-seeded generator
        z = mean + (0.5 * logvar).exp() * noise
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(1).mean()
        return (self.dec(z) - x).square().mean() + 0.01 * kl


def toy_task(cfg, data):
    torch.manual_seed(cfg.train.seed)
    model = ToyVAE(cfg.dim, cfg.latent)

    def batch(k, acc):
        idx = batch_indices(k, len(data), cfg.train.batch_size, cfg.train.seed)
        return {"x": data[idx[acc.process_index :: acc.num_processes]]}

    return TrainTask(model=model, loss=model, batch=batch, config=cfg, kind="toy-vae")


def toy_config(**train):
    t = {"batch_size": 16, "lr": 1e-2, "warmup_steps": 2, "log_every": 5, "sample_every": 0}
    return ToyConfig(train=TrainConfig(**{**t, "ckpt_every": 0, "max_steps": 40, **train}))


@pytest.fixture(scope="module")
def vectors():
    g = torch.Generator().manual_seed(0)
    return torch.randn(200, 2, generator=g) @ torch.randn(2, 6, generator=g)  # rank-2 data


def test_toy_vae_trains_and_resumes_exactly(tmp_path, vectors):
    cfg = toy_config()
    Trainer(toy_task(cfg, vectors), tmp_path / "straight").run(progress=False)
    stopped = Trainer(toy_task(cfg, vectors), tmp_path / "split")
    for _ in range(17):
        stopped.train_step()
    stopped.save()
    Trainer(toy_task(cfg, vectors), tmp_path / "split", resume=True).run(progress=False)
    _, step_a, a = read_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME, ToyConfig, "toy-vae")
    saved, step_b, b = read_checkpoint(tmp_path / "split" / CHECKPOINT_NAME, ToyConfig, "toy-vae")
    assert step_a == step_b == 40 and saved == cfg
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    log = [
        json.loads(s) for s in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    assert log[-1]["loss"] < 0.6 * log[0]["loss"], log  # it learns the rank-2 data
    with pytest.raises(CondloraError, match="toy-vae checkpoint, not a image-diffusion"):
        read_run_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)


def test_nan_loss_stops_and_keeps_the_last_finite_checkpoint(tmp_path, vectors):
    cfg = toy_config(ckpt_every=10, max_steps=40)
    task = toy_task(cfg, vectors)
    trainer = Trainer(task, tmp_path)
    clean = task.batch

    def batch(k, acc):  # the data turns to NaN from step 15 on
        x = clean(k, acc)["x"]
        return {"x": x * float("nan") if k >= 15 else x}

    task.batch = batch
    with pytest.raises(TrainingDiverged, match="diverged at step 16.*last checkpoint"):
        trainer.run(progress=False)
    _, step, parts = read_checkpoint(tmp_path / CHECKPOINT_NAME, ToyConfig, "toy-vae")
    assert step == 10 and all(torch.isfinite(v).all() for v in parts["model"].values())


def test_nonfinite_limit_skips_bad_steps_until_it_is_reached(tmp_path, vectors):
    cfg = toy_config(nonfinite_limit=3, max_steps=12)
    task = toy_task(cfg, vectors)
    clean = task.batch
    task.batch = lambda k, acc: {"x": clean(k, acc)["x"] * (float("inf") if k in (4, 5) else 1)}
    trainer = Trainer(task, tmp_path)
    trainer.run(progress=False)  # two bad steps in a row < 3: skipped, weights stay finite
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nan_to_num_grads_replaces_as_edm_does(tmp_path):
    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(4))

        def forward(self, x):  # a finite loss ...
            return self.p.sum() * x.sum()

    loss = Loss()  # ... whose gradient a hook makes (nan, inf, -inf, 1)
    loss.p.register_hook(lambda g: torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0]))
    cfg = ToyConfig(train=TrainConfig(batch_size=1, grad_clip=0, nan_to_num_grads=True))
    trainer = Trainer(
        TrainTask(loss, loss, lambda k, acc: {"x": torch.ones(1)}, cfg, "toy"), tmp_path
    )
    seen = []
    trainer.opt.step = lambda: seen.append(loss.p.grad.clone())  # what AdamW would get
    trainer.train_step()
    assert torch.equal(seen[0], torch.tensor([0.0, 1e5, -1e5, 1.0]))


def tiny(name, overrides):
    return load_config(CONFIGS / name, overrides)


def test_resume_refuses_a_changed_objective_and_writes_nothing(tmp_path, tiny_overrides):
    cfg = tiny("digits-baseline.yaml", tiny_overrides)
    train(cfg, tmp_path, max_steps=2, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    for change in ("diffusion.objective=v", "diffusion.p_mean=-0.5", "train.lr=1"):
        other = tiny("digits-baseline.yaml", [*tiny_overrides, change])
        with pytest.raises(CondloraError, match=change.split("=")[0]):
            image_trainer(other, tmp_path, resume=True)
    # a damaged checkpoint: the resume fails, and config.yaml is still the run's own
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint at all")
    other = tiny("digits-baseline.yaml", [*tiny_overrides, "train.lr=1"])
    with pytest.raises(CondloraError):
        image_trainer(other, tmp_path, resume=True)
    assert (tmp_path / "config.yaml").read_bytes() == before["config.yaml"]
    assert (tmp_path / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]


def test_metrics_log_keeps_each_step_once_after_a_kill(tmp_path, tiny_overrides):
    cfg = tiny("digits-baseline.yaml", tiny_overrides + ["train.log_every=1", "train.max_steps=6"])
    trainer = image_trainer(cfg, tmp_path)
    trainer.run = None  # not used: emulate a run killed after logging past its checkpoint
    for _ in range(3):
        trainer.train_step()
    trainer.save()
    for _ in range(2):
        trainer.train_step()
        trainer._record([1.0], 0.0, 0.0)  # logged, never saved (the process dies here)
    train(cfg, tmp_path, resume=True, progress=False)
    steps = [json.loads(s)["step"] for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 5, 6]  # 1-3 were never logged here; 4 and 5 once, not twice


def test_fresh_run_starts_a_new_log(tmp_path, tiny_overrides):
    """A start of the same run killed before its first checkpoint (its config.yaml and log
    lines, no checkpoint) is started again with a new log; other files are refused."""
    cfg = tiny("digits-baseline.yaml", tiny_overrides + ["train.max_steps=5"])
    train(cfg, tmp_path, progress=False)
    (tmp_path / CHECKPOINT_NAME).unlink()
    with (tmp_path / "metrics.jsonl").open("a") as log:
        log.write('{"step": 99, "loss": 1}\n')
    train(cfg, tmp_path, progress=False)
    assert [
        json.loads(s)["step"] for s in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ] == [5]
    (tmp_path / CHECKPOINT_NAME).unlink()
    other = tiny("digits-baseline.yaml", tiny_overrides + ["train.max_steps=6"])
    with pytest.raises(CondloraError, match="not a start of this run"):
        train(other, tmp_path, progress=False)


@pytest.mark.slow
def test_init_from_a_baseline_keeps_its_function_then_trains(tmp_path, tiny_overrides):
    base_cfg = tiny("digits-baseline.yaml", tiny_overrides)
    train(base_cfg, tmp_path / "base", max_steps=3, progress=False)
    base = read_run_checkpoint(tmp_path / "base" / CHECKPOINT_NAME)[2]["ema"]
    baseline = build_denoiser(base_cfg)
    baseline.load_state_dict(base)
    lora_cfg = tiny(
        "digits-uclora.yaml", [*tiny_overrides, "train.channels_last=false", "train.max_steps=3"]
    )
    trainer = image_trainer(lora_cfg, tmp_path / "lora", init_path=tmp_path / "base")
    x, sigma, y = torch.randn(4, 1, 16, 16), torch.tensor([0.1, 1.0, 3.0, 20.0]), torch.arange(4)
    with torch.no_grad():
        assert_same_function(
            trainer.model(x, sigma, class_labels=y), baseline(x, sigma, class_labels=y)
        )
    trainer.run(progress=False)
    with torch.no_grad():
        change = trainer.model(x, sigma, class_labels=y) - baseline(x, sigma, class_labels=y)
    assert change.abs().max() > 1e-3  # trained: far beyond the rounding tolerance
    wrong = tiny("digits-baseline.yaml", tiny_overrides + ["net.model_channels=16"])
    with pytest.raises(CondloraError, match="does not fit: shape mismatches"):
        image_trainer(wrong, tmp_path / "wrong", init_path=tmp_path / "base")
    with pytest.raises(CondloraError, match="no such run folder"):
        image_trainer(lora_cfg, tmp_path / "x", init_path=tmp_path / "nowhere")


def conv_output_dtypes(trainer):
    """Record the output dtype of every conv of the model while the trainer runs."""
    seen = set()
    for module in trainer.model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    return seen


def conv_weights_channels_last(trainer):
    """Whether every 4-d conv weight with a real kernel is in channels-last memory."""
    weights = [p for p in trainer.model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert weights
    return {p.is_contiguous(memory_format=torch.channels_last) for p in weights}


@pytest.mark.parametrize(
    "extra, observed",
    [
        (["train.grad_accum=2"], None),  # no_sync on the first micro-batch (see below)
        (["train.mixed_precision=bf16"], ("dtypes", {torch.bfloat16})),  # autocast on the CPU
        (["train.mixed_precision='no'"], ("dtypes", {torch.float32})),
        (["train.channels_last=true"], ("layout", {True})),
        (["train.channels_last=false"], ("layout", {False})),
    ],
)
def test_loop_options_train(tmp_path, tiny_overrides, extra, observed):
    cfg = tiny("digits-uclora.yaml", tiny_overrides + ["train.max_steps=4", *extra])
    trainer = image_trainer(cfg, tmp_path)
    dtypes = conv_output_dtypes(trainer)
    trainer.run(progress=False)
    log = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and all(torch.isfinite(p).all() for p in trainer.model.parameters())
    if observed is not None:  # the option took effect, not only did not break the run
        kind, expected = observed
        assert (dtypes if kind == "dtypes" else conv_weights_channels_last(trainer)) == expected


def test_grad_accum_averages_its_micro_batches(tmp_path, vectors):
    """Two micro-batches of 16 give the gradient of one batch of 32 (the same examples)."""
    grads = {}
    for name, batch, accum in (("one", 32, 1), ("two", 16, 2)):
        task = toy_task(toy_config(batch_size=batch, grad_accum=accum, grad_clip=0), vectors)
        task.model.sample = False
        trainer = Trainer(task, tmp_path / name)
        trainer.opt.step = lambda t=trainer, n=name: grads.setdefault(
            n, [p.grad.clone() for p in t.params]
        )
        trainer.train_step()
    for a, b in zip(grads["one"], grads["two"], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads["one"])


def test_metrics_go_to_tensorboard(tmp_path, tiny_overrides):
    cfg = tiny("digits-baseline.yaml", tiny_overrides + ["train.log_with=tensorboard"])
    train(cfg, tmp_path, max_steps=5, progress=False)
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, list(tmp_path.rglob("*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [5]


@pytest.mark.slow
def test_sigterm_saves_and_exits(tmp_path, tiny_overrides):
    args = [sys.executable, "-m", "condlora.cli", "train", "--config"]
    args += [str(CONFIGS / "digits-baseline.yaml"), "--out", str(tmp_path), "--quiet"]
    args += [*tiny_overrides, "train.max_steps=100000", "train.log_every=1"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-500:]
    assert "terminated (SIGTERM)" in err.decode()
    step = read_run_checkpoint(tmp_path / CHECKPOINT_NAME)[1]
    assert step >= 3
    assert (
        main(
            [
                "train",
                "--config",
                str(CONFIGS / "digits-baseline.yaml"),
                "--out",
                str(tmp_path),
                "--resume",
                "--quiet",
                "--max-steps",
                str(step + 2),
                *tiny_overrides,
            ]
        )
        == 0
    )
    assert read_run_checkpoint(tmp_path / CHECKPOINT_NAME)[1] == step + 2


def test_a_run_writes_an_ema_only_inference_file_that_sampling_reads(tmp_path):
    cfg = load_config(CONFIGS / "digits-baseline.yaml", [*TINY, "train.max_steps=3"])
    train(cfg, tmp_path / "run", progress=False)
    ema = tmp_path / "run" / EMA_NAME
    saved, step, state = read_ema_model(ema, Config, IMAGE_KIND)
    _, ckpt_step, parts = read_run_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    assert step == ckpt_step == 3 and saved == cfg
    assert state.keys() == parts["ema"].keys()  # the EMA weights alone: no model., no optim.
    assert all(torch.equal(state[k], parts["ema"][k]) for k in state)
    assert ema.stat().st_size < (tmp_path / "run" / CHECKPOINT_NAME).stat().st_size / 2
    # sampling reads the inference file: with the checkpoint gone, the run still loads ...
    (tmp_path / "run" / CHECKPOINT_NAME).unlink()
    _, denoiser, loaded_step = load_run(tmp_path / "run")
    assert loaded_step == 3
    assert all(torch.equal(v, state[k]) for k, v in denoiser.state_dict().items())
    # ... and a folder from before inference files loads from its checkpoint's EMA part
    train(cfg, tmp_path / "old", progress=False)
    (tmp_path / "old" / EMA_NAME).unlink()
    assert load_run(tmp_path / "old")[2] == 3
