"""Synthesis training through the generic loop: batches, latents, model folder, exact resume."""

import json

import pytest
import torch
import yaml
from accelerate import Accelerator

from condlora.synthesis.collection import LoRADataset
from condlora.synthesis.config import PriorRunConfig, VAERunConfig
from condlora.synthesis.generate import SynthModel
from condlora.synthesis.model import ModelInfo, floored_std
from condlora.synthesis.training import (
    PRIOR_KIND,
    VAE_KIND,
    RowBatches,
    dataset_rows,
    encode_collection,
    load_vae,
    train_prior,
    train_synthesis,
    train_vae,
)
from condlora.train.checkpoint import CHECKPOINT_NAME, read_checkpoint
from condlora.train.loop import batch_indices

from .synth_common import linear_collection, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
STAGES = (("vae", VAERunConfig, VAE_KIND), ("prior", PriorRunConfig, PRIOR_KIND))


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return linear_collection(tmp_path_factory.mktemp("data") / "ds.safetensors")


def test_batches_are_standardised_rows_with_dropout(collection, tmp_path):
    path, vectors, emb, *_ = collection
    dataset = LoRADataset(path)
    cfg = tiny_config(path, "std_floor=0.5")
    info = ModelInfo.from_dataset(dataset, cfg)
    std = vectors.std(0, unbiased=False)
    floor = 0.5 * std.mean()
    torch.testing.assert_close(info.std, torch.where(std < floor, floor, std))
    assert (std < floor).any() and torch.equal(info.std, floored_std(dataset.std, 0.5))
    batches = RowBatches(dataset_rows(dataset, info), 32, cfg.prior_train, "x0", emb, 0.5)
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    batch = batches(3, acc)
    rows = batch_indices(3, 32, 8, cfg.prior_train.seed)  # global batch 3, one process
    reference = (vectors[rows] - vectors.mean(0)) / info.std  # standardised by hand
    torch.testing.assert_close(batch["x0"], reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch["embedding"], emb[rows])
    assert batch["drop"].dtype == torch.bool and batch["drop"].shape == (8,)
    drops = torch.stack([batches(k, acc)["drop"] for k in range(200)]).float().mean()
    assert 0.4 < drops < 0.6


def test_model_folder_holds_what_generation_needs(collection, tmp_path):
    path, vectors, emb, *_ = collection
    cfg = tiny_config(path)
    out = train_synthesis(cfg, tmp_path / "m", progress=False)
    info = ModelInfo.read(out)
    dataset = LoRADataset(path)
    assert info.signature and info.cond_dim == 4 and info.count == 32 and info.method == "diffusion"
    torch.testing.assert_close(info.mean, vectors.mean(0), atol=1e-5, rtol=0)
    # latent statistics: the frozen VAE's latent means over the standardised collection
    _, vae = load_vae(out)
    with torch.no_grad():
        means = vae.encode(info.standardise(vectors))[0]
    torch.testing.assert_close(info.latent_mean, means.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(info.latent_std, means.std(0, unbiased=False), atol=1e-5, rtol=0)
    torch.testing.assert_close(encode_collection(vae, dataset, info), means, atol=1e-5, rtol=0)
    for stage, cls, kind in (
        ("vae", VAERunConfig, VAE_KIND),
        ("prior", PriorRunConfig, PRIOR_KIND),
    ):
        run_cfg, step, _ = read_checkpoint(out / stage / CHECKPOINT_NAME, cls, kind)
        assert step == 6 and run_cfg.layout == info.signature
        assert (out / stage / "loss.png").stat().st_size > 1000
        logged = [json.loads(s)["step"] for s in (out / stage / "metrics.jsonl").open()]
        assert logged == [2, 4, 6]
    prior_cfg = read_checkpoint(out / "prior" / CHECKPOINT_NAME, PriorRunConfig, PRIOR_KIND)[0]
    assert prior_cfg.prior.net.dim == 6 and prior_cfg.prior.net.cond_dim == 4  # from the data
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["kind"] == "synthesis" and saved["dim"] == 22 and saved["cond_dim"] == 4


def _same_checkpoints(a, b, cls, kind):
    _, step_a, parts_a = read_checkpoint(a / CHECKPOINT_NAME, cls, kind)
    _, step_b, parts_b = read_checkpoint(b / CHECKPOINT_NAME, cls, kind)
    assert step_a == step_b
    for part in ("model", "ema"):
        assert parts_a[part].keys() == parts_b[part].keys()
        for key in parts_a[part]:
            assert torch.equal(parts_a[part][key], parts_b[part][key]), (part, key)
    for slot, state in parts_a["optim"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, parts_b["optim"]["state"][slot][name]), (slot, name)


@pytest.mark.parametrize("objective", ["v", "x0"])
def test_vae_and_prior_resume_bit_exactly(collection, tmp_path, objective):
    path = collection[0]
    full = tiny_config(path, f"prior.objective={objective}", "prior.cond_dropout=0.3")
    train_vae(full, tmp_path / "straight", progress=False)
    train_prior(full, tmp_path / "straight", progress=False)
    short = tiny_config(
        path,
        f"prior.objective={objective}",
        "prior.cond_dropout=0.3",
        "vae_train.max_steps=3",
        "prior_train.max_steps=3",
    )
    train_vae(short, tmp_path / "split", progress=False)
    train_vae(full, tmp_path / "split", resume=True, progress=False)
    train_prior(short, tmp_path / "split", progress=False)
    train_prior(full, tmp_path / "split", resume=True, progress=False)
    for stage, cls, kind in (
        ("vae", VAERunConfig, VAE_KIND),
        ("prior", PriorRunConfig, PRIOR_KIND),
    ):
        _same_checkpoints(tmp_path / "straight" / stage, tmp_path / "split" / stage, cls, kind)


def test_raw_vector_prior_and_separate_vae_folder(collection, tmp_path):
    path = collection[0]
    raw = train_synthesis(tiny_config(path, "use_vae=false"), tmp_path / "raw", progress=False)
    run_cfg = read_checkpoint(raw / "prior" / CHECKPOINT_NAME, PriorRunConfig, PRIOR_KIND)[0]
    assert run_cfg.prior.net.dim == 22 and not run_cfg.use_vae and not (raw / "vae").exists()
    assert ModelInfo.read(raw).latent_mean is None
    # the prior in another folder than its VAE: the VAE run is copied next to it
    vae_dir = train_vae(tiny_config(path), tmp_path / "v", progress=False)
    out = train_prior(tiny_config(path), tmp_path / "p", vae_dir, progress=False)
    a = (vae_dir / "vae" / CHECKPOINT_NAME).read_bytes()
    assert (out / "vae" / CHECKPOINT_NAME).read_bytes() == a
    assert (
        ModelInfo.read(out).latent_mean is not None and ModelInfo.read(vae_dir).latent_mean is None
    )


@pytest.mark.slow
def test_the_pipeline_learns_a_linear_collection(tmp_path):
    """VAE + x0 prior, 150 steps each: LoRAs for unseen embeddings beat the mean LoRA."""
    path, vectors, emb, mixing, offset = linear_collection(tmp_path / "ds", n=64, noise=0.0)
    steps = [f"{s}.{k}" for s in ("vae_train", "prior_train") for k in ("max_steps=150", "lr=3e-3")]
    steps += ["vae_train.batch_size=32", "prior_train.batch_size=32", "prior.cond_dropout=0"]
    widths = ["prior.net.width=32", "prior.net.depth=2", "vae.hidden=32", "prior.steps=10"]
    cfg = tiny_config(path, "prior.objective=x0", *steps, *widths)
    model = SynthModel.load(train_synthesis(cfg, tmp_path / "m", progress=False))
    unseen = torch.randn(32, 4, generator=torch.Generator().manual_seed(9))
    truth = model.info.standardise(unseen @ mixing.T + offset)
    got = model.info.standardise(model.vectors(unseen)[:, 0])
    error, spread = (got - truth).square().mean(), truth.square().mean()
    assert error < 0.6 * spread, (error, spread)  # seen: 0.48 against 1.28
