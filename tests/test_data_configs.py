"""Training and sampling on CIFAR-10-format files and image folders made by the tests."""

import shutil

import numpy as np
import pytest
from PIL import Image

from condlora.cli import main
from condlora.core.errors import ConfigError
from condlora.image.build import build_data, num_classes
from condlora.image.config import load_config

from .conftest import CONFIGS
from .test_data_files import _write_cifar

SMALL = ["net.model_channels=8", "train.batch_size=8", "train.sample_every=0", "--quiet"]


def train_then_sample(tmp_path, data_args, label=None):
    run, grid = tmp_path / "run", tmp_path / "grid.png"
    args = ["train", "--config", str(CONFIGS / "digits-uclora.yaml"), "--out", str(run)]
    assert main([*args, "--max-steps", "3", *SMALL, *data_args]) == 0
    return run, grid


@pytest.mark.slow
def test_cifar10_trains_and_samples_without_the_data(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    data = [f"data.path={tmp_path / 'cifar-10-batches-py'}", "data.name=cifar10"]
    run, grid = train_then_sample(tmp_path, [*data, "data.resolution=32"])
    shutil.rmtree(tmp_path / "cifar-10-batches-py")  # a run rebuilds from its own config
    assert main(["sample", "--run", str(run), "--num", "3", "--out", str(grid)]) == 0
    image = Image.open(grid)
    assert image.mode == "RGB" and image.size == (4 * (10 * 33 + 1), 4 * 34)


def write_folder(root, classes, per_class=6):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{k}.png")


@pytest.mark.slow
def test_image_folder_classes_come_from_subfolders(tmp_path):
    write_folder(tmp_path / "imgs", ["cats", "dogs", "owls"])
    data = ["data.name=folder", f"data.path={tmp_path / 'imgs'}", "data.holdout=3"]
    cfg = load_config(CONFIGS / "digits-baseline.yaml", data)
    assert num_classes(cfg) == 3 and cfg.data.channels == 3
    (train_x, train_y), (hold_x, _) = build_data(cfg)
    assert train_x.shape == (15, 3, 16, 16) and len(hold_x) == 3
    assert sorted(set(train_y.tolist())) == [0, 1, 2]
    run, grid = train_then_sample(tmp_path, data)
    assert (
        main(["sample", "--run", str(run), "--num", "2", "--out", str(grid), "--label", "2"]) == 0
    )
    assert (
        main(["sample", "--run", str(run), "--num", "2", "--out", str(grid), "--label", "3"]) == 2
    )


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["data.name=cifar10"], "needs data.path"),
        (["data.name=cifar10", "data.path=/x", "data.resolution=16"], "32x32"),
        (["data.name=imagenet"], "valid: digits, cifar10, folder"),
    ],
)
def test_data_config_mistakes(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(CONFIGS / "digits-baseline.yaml", overrides)


def test_flat_folder_needs_an_unconditional_model(tmp_path):
    write_folder(tmp_path / "imgs", ["cats"])
    for f in (tmp_path / "imgs" / "cats").iterdir():
        f.rename(tmp_path / "imgs" / f.name)
    data = ["data.name=folder", f"data.path={tmp_path / 'imgs'}", "data.holdout=1"]
    with pytest.raises(ConfigError, match="class_conditional: false"):
        num_classes(load_config(CONFIGS / "digits-baseline.yaml", data))
    cfg = load_config(CONFIGS / "digits-baseline.yaml", [*data, "net.class_conditional=false"])
    assert num_classes(cfg) == 0 and len(build_data(cfg)[0][0]) == 5
