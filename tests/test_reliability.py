"""The validation layer's pieces: atomic writes, size checks, non-finite refusals, paths, logs."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

import condlora.core.safetensors_io as sio
from condlora.core.config import Each, OneOf, Range, from_dict
from condlora.core.errors import CondloraError, ConfigError, DataError, LoRAError
from condlora.core.files import read_jsonl, undone_on_error
from condlora.core.images import save_grid
from condlora.core.safetensors_io import read_weights, write_weights
from condlora.image.build import build_denoiser
from condlora.image.checks import check_model_size, sampling_config
from condlora.image.config import Config, load_config
from condlora.lora import load_lora
from condlora.metrics import frechet_of_features, frechet_to_stats, gaussian_stats
from condlora.metrics.reference import kid_from_features
from condlora.train.config import TrainConfig

from .conftest import CONFIGS, TINY


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    write_weights(path, {"a": torch.ones(2)}, {"format": "x"})
    old = path.read_bytes()

    def half_written(tensors, name, metadata):
        open(name, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sio, "save_file", half_written)
    with pytest.raises(CondloraError, match="cannot write .*No space left"):
        write_weights(path, {"a": torch.zeros(2)}, {"format": "x"})
    assert path.read_bytes() == old and sorted(tmp_path.iterdir()) == [path]
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(CondloraError, match="is a folder"):
        write_weights(tmp_path / "d.safetensors", {"a": torch.zeros(2)}, {"format": "x"})


def test_a_failed_block_puts_its_folder_back_and_an_interrupt_keeps_the_work(tmp_path):
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    (folder / "kept.txt").write_text("old")

    def work():
        (folder / "kept.txt").write_text("new")
        (folder / "sub" / "made").mkdir()
        (folder / "sub" / "made" / "f.bin").write_bytes(b"x")
        (folder / "g.txt").write_text("g")

    with pytest.raises(DataError), undone_on_error(folder):
        work()
        raise DataError("diverged")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "kept.txt",
        "sub",
    ]
    assert (folder / "kept.txt").read_text() == "old"
    with pytest.raises(DataError), undone_on_error(tmp_path / "new" / "deeper"):
        (tmp_path / "new" / "deeper").mkdir(parents=True)
        raise DataError("diverged")
    assert not (tmp_path / "new").exists()
    with pytest.raises(KeyboardInterrupt), undone_on_error(folder):
        work()
        raise KeyboardInterrupt
    assert (folder / "kept.txt").read_text() == "new" and (folder / "g.txt").exists()


def test_reads_refuse_non_finite_tensors_unless_asked(tmp_path):
    path = tmp_path / "w.safetensors"
    write_weights(path, {"a": torch.tensor([1.0, math.inf]), "i": torch.arange(3)}, {"format": "x"})
    with pytest.raises(DataError, match="tensor a holds NaN or inf"):
        read_weights(path, "x", "demo", DataError)
    _, tensors = read_weights(path, "x", "demo", DataError, finite=False)
    assert torch.equal(tensors["i"], torch.arange(3))


def test_a_damaged_lora_file_is_a_lora_error(tmp_path):
    from torch import nn

    path = tmp_path / "l.safetensors"
    path.write_bytes(b"")
    with pytest.raises(LoRAError, match="too short"):
        load_lora(nn.Linear(2, 2), path)


def test_meta_parameter_counts_match_the_built_models():
    for name in ("digits-baseline", "digits-uclora", "digits-timelora", "digits-onlylora"):
        cfg = load_config(CONFIGS / f"{name}.yaml", TINY)
        built = sum(p.numel() for p in build_denoiser(cfg).parameters())
        assert check_model_size(cfg) == built, name


def test_every_shipped_config_passes_the_checks():
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path, ["data.path=/x"] if "cifar" in path.name else [])
        assert check_model_size(cfg) < 60_000_000, path.name  # the paper's nets: <= 58 M


def test_range_table_and_its_messages():
    assert Range(0, 1, high_open=True).problem(0.5) is None
    assert Range(0, 1, high_open=True).problem(1.0) == "must be in [0, 1)"
    assert Range(1).problem(float("nan")) == "must be >= 1"
    assert Range().problem(float("inf")) == "must be a finite number"
    assert OneOf(("a", "b")).problem("c") == "valid: a, b"
    assert Each(Range(1)).problem([]) == "must be a non-empty list"
    assert Each(Range(1)).problem([1, 0]) == "must be a list of numbers >= 1"
    # a config checks itself when built: named by its class in code, by its key from a file
    with pytest.raises(ConfigError, match=r"^TrainConfig.ema_decay must be in \[0, 1\], got 2"):
        TrainConfig(ema_decay=2)
    with pytest.raises(ConfigError, match=r"^net.num_heads must be in \[1, 1024\], got 0"):
        from_dict(Config, {"net": {"num_heads": 0}})
    with pytest.raises(ConfigError, match=r"^train.ema_decay must be in \[0, 1\], got 2"):
        from_dict(Config, {"train": {"ema_decay": 2}})
    with pytest.raises(ConfigError, match=r"^NetConfig.num_heads must be in \[1, 1024\]"):
        dataclasses.replace(Config().net, num_heads=0)  # replace builds, so it checks too


def test_guidance_checks():
    cfg = load_config(CONFIGS / "digits-baseline.yaml", ["train.label_dropout=0.1"])
    assert sampling_config(cfg, guidance=2.0).diffusion.guidance == 2.0
    assert sampling_config(cfg, guidance=1.0).diffusion.guidance == 1.0  # 1 is no guidance
    plain = load_config(CONFIGS / "digits-baseline.yaml")
    assert sampling_config(plain, steps=3, guidance=1.0).diffusion.guidance == 1.0
    with pytest.raises(CondloraError, match="label dropout"):
        sampling_config(plain, guidance=3.0)
    uncond = load_config(CONFIGS / "digits-baseline.yaml", ["net.class_conditional=false"])
    with pytest.raises(CondloraError, match="unconditional"):
        sampling_config(uncond, guidance=3.0)


def test_non_finite_features_are_refused_before_any_linear_algebra():
    good = np.random.default_rng(0).normal(size=(20, 3))
    bad = good.copy()
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN or inf"):
        gaussian_stats(bad)
    mu, sigma = gaussian_stats(good)
    with pytest.raises(DataError, match="NaN or inf"):
        frechet_to_stats(torch.from_numpy(good), mu * np.nan, sigma, 20)
    with pytest.raises(DataError, match="NaN or inf"):
        frechet_of_features(torch.from_numpy(good), torch.from_numpy(bad))
    with pytest.raises(DataError, match="NaN or inf"):
        kid_from_features(torch.from_numpy(good), torch.from_numpy(bad))


def test_scores_of_nan_samples_are_refused():
    from condlora.evaluation.evaluate import score

    samples = torch.zeros(4, 1, 16, 16)
    samples[1] = math.nan
    with pytest.raises(DataError, match="samples hold NaN"):
        score(judge=None, samples=samples, labels=None)


@pytest.mark.parametrize("suffix, fmt", [(".png", "PNG"), (".JPG", "JPEG"), (".webp", "WEBP")])
def test_grids_follow_the_extension_and_leave_no_temporary(tmp_path, suffix, fmt):
    path = save_grid(torch.zeros(3, 1, 4, 4), tmp_path / "sub" / f"g{suffix}", nrow=2)
    with Image.open(path) as img:
        assert img.format == fmt and img.size == (4 * (2 * 5 + 1), 4 * (2 * 5 + 1))
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    with pytest.raises(CondloraError, match="has extension '.txt'"):
        save_grid(torch.zeros(1, 1, 4, 4), tmp_path / "g.txt")


def test_a_torn_log_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2}\n{"step": 2, "loss": 1}\n{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
