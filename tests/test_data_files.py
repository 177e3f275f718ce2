"""CIFAR-10 (folder and archive, restricted unpickling) and image-folder loaders."""

import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from condlora.core.errors import DataError
from condlora.data import CIFAR10_CLASSES, load_cifar10, load_image_folder

PER_BATCH = 4
BATCHES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]


def _batch(seed, n=PER_BATCH):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, size=n)]
    return {b"batch_label": b"x", b"data": data, b"labels": labels, b"filenames": [b"f"] * n}


def _write_cifar(folder, protocol=2):
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, name in enumerate([*BATCHES, "test_batch"]):
        batch = _batch(i)
        written[name] = batch
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return written


@pytest.fixture
def cifar_dir(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    return folder, _write_cifar(folder)


@pytest.fixture
def cifar_tar(tmp_path, cifar_dir):
    folder, written = cifar_dir
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive, written


def _check(images, labels, batches):
    n = PER_BATCH * len(batches)
    assert images.shape == (n, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.long
    assert images.min() >= -1.0 and images.max() <= 1.0
    expect_labels = [y for b in batches for y in b[b"labels"]]
    assert labels.tolist() == expect_labels
    data = np.concatenate([b[b"data"] for b in batches])
    for k in range(n):
        g00 = int(data[k, 1024])  # channel G, row 0, col 0
        assert images[k, 1, 0, 0].item() == pytest.approx(g00 / 127.5 - 1.0, abs=1e-6)
        r_last = int(data[k, 1023])  # channel R, row 31, col 31
        assert images[k, 0, 31, 31].item() == pytest.approx(r_last / 127.5 - 1.0, abs=1e-6)
        b_row1 = int(data[k, 2048 + 32 + 5])  # channel B, row 1, col 5
        assert images[k, 2, 1, 5].item() == pytest.approx(b_row1 / 127.5 - 1.0, abs=1e-6)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_folder_train_and_test(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    written = _write_cifar(folder, protocol=protocol)
    images, labels = load_cifar10(folder)
    _check(images, labels, [written[n] for n in BATCHES])
    images, labels = load_cifar10(str(folder), split="test")
    _check(images, labels, [written["test_batch"]])


def test_cifar_archive_matches_folder(cifar_dir, cifar_tar):
    archive, written = cifar_tar
    images, labels = load_cifar10(archive)
    _check(images, labels, [written[n] for n in BATCHES])
    folder_images, folder_labels = load_cifar10(cifar_dir[0])
    assert torch.equal(images, folder_images) and torch.equal(labels, folder_labels)
    images, labels = load_cifar10(archive, "test")
    _check(images, labels, [written["test_batch"]])


def test_cifar_parent_folder_is_accepted(cifar_dir):
    folder, written = cifar_dir
    _, labels = load_cifar10(folder.parent, "test")
    assert labels.tolist() == written["test_batch"][b"labels"]


def test_cifar_classes():
    assert len(CIFAR10_CLASSES) == 10 and CIFAR10_CLASSES[0] == "airplane"
    assert CIFAR10_CLASSES[-1] == "truck"


def test_cifar_extreme_bytes_map_to_the_ends(tmp_path):
    folder = tmp_path / "c"
    _write_cifar(folder)
    batch = _batch(0)
    batch[b"data"][0] = 0
    batch[b"data"][1] = 255
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    images, _ = load_cifar10(folder, "test")
    assert images[0].eq(-1.0).all() and images[1].eq(1.0).all()


def test_cifar_missing_path(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10 not found at .*cifar-10-python.tar.gz"):
        load_cifar10(tmp_path / "nowhere")


def test_cifar_bad_split(cifar_dir):
    with pytest.raises(DataError, match="split"):
        load_cifar10(cifar_dir[0], split="valid")


def test_cifar_missing_batch_file(cifar_dir):
    folder, _ = cifar_dir
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(folder)
    load_cifar10(folder, "test")  # the test split does not need it


def test_cifar_archive_missing_member(tmp_path, cifar_dir):
    folder, _ = cifar_dir
    archive = tmp_path / "partial.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "data_batch_1", arcname="cifar-10-batches-py/data_batch_1")
    with pytest.raises(DataError, match="no data_batch_2"):
        load_cifar10(archive)


def test_cifar_not_an_archive(tmp_path):
    bogus = tmp_path / "cifar-10-python.tar.gz"
    bogus.write_bytes(b"this is not a tar file at all")
    with pytest.raises(DataError, match="not a readable"):
        load_cifar10(bogus)


def test_cifar_truncated_file(cifar_dir):
    folder, _ = cifar_dir
    file = folder / "data_batch_2"
    file.write_bytes(file.read_bytes()[:5000])
    with pytest.raises(DataError, match="data_batch_2.*not a readable"):
        load_cifar10(folder)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_malicious_pickle_is_refused_not_run(cifar_dir, tmp_path, protocol):
    folder, _ = cifar_dir
    marker = tmp_path / "pwned"
    evil = {b"data": _Evil(marker), b"labels": [0]}
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(evil, f, protocol=protocol)
    with pytest.raises(DataError, match="test_batch.*refused"):
        load_cifar10(folder, "test")
    assert not marker.exists()


def test_cifar_malicious_pickle_in_archive(tmp_path, cifar_dir):
    folder, _ = cifar_dir
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f, protocol=2)
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    with pytest.raises(DataError, match="data_batch_1.*refused"):
        load_cifar10(archive)
    assert not marker.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({b"data": np.zeros((4, 3000), np.uint8)}, "shape"),
        ({b"data": np.zeros((4, 3072), np.float32)}, "uint8"),
        ({b"labels": [0, 1, 2]}, "4 images but 3 labels"),
        ({b"labels": [0, 1, 2, 10]}, "0..9"),
        ({b"labels": [0, 1, -1, 2]}, "0..9"),
        ({b"labels": ["a", "b", "c", "d"]}, "integers"),
    ],
)
def test_cifar_malformed_batch(cifar_dir, change, message):
    folder, _ = cifar_dir
    batch = _batch(7)
    batch.update(change)
    with open(folder / "data_batch_4", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(DataError, match=f"data_batch_4.*{message}"):
        load_cifar10(folder)


def test_cifar_not_a_dict(cifar_dir):
    folder, _ = cifar_dir
    with open(folder / "test_batch", "wb") as f:
        pickle.dump([1, 2, 3], f, protocol=2)
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10(folder, "test")


# ---------------------------------------------------------------- image folders


def _save(path, size, color, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_flat_folder(tmp_path):
    _save(tmp_path / "a.png", (10, 10), (255, 0, 0))
    _save(tmp_path / "b.JPG", (20, 12), (0, 255, 0))
    _save(tmp_path / "c.bmp", (8, 8), (0, 0, 255))
    (tmp_path / "notes.txt").write_text("not an image")
    images, labels, classes = load_image_folder(tmp_path, resolution=8)
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.float32
    assert labels is None and classes == []
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert torch.allclose(images[0, :, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(images[2, :, 4, 4], torch.tensor([-1.0, -1.0, 1.0]))
    assert images[1, 1].mean() > 0.9  # JPEG: close to pure green


def test_class_subfolders(tmp_path):
    _save(tmp_path / "dog" / "1.png", (16, 16), (10, 20, 30))
    _save(tmp_path / "cat" / "x.png", (16, 16), (40, 50, 60))
    _save(tmp_path / "cat" / "y.webp", (16, 16), (40, 50, 60))
    _save(tmp_path / "bird" / "z.jpeg", (16, 16), (0, 0, 0))
    images, labels, classes = load_image_folder(tmp_path, resolution=4)
    assert classes == ["bird", "cat", "dog"]
    assert labels.dtype == torch.long and labels.tolist() == [0, 1, 1, 2]
    assert images.shape == (4, 3, 4, 4)
    expect = torch.tensor([10, 20, 30]) / 127.5 - 1.0
    assert torch.allclose(images[3, :, 0, 0], expect, atol=1e-6)


def test_center_crop_then_resize(tmp_path):
    # 30 x 10: left third red, middle third green, right third blue -> the crop keeps green
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    img.paste((0, 255, 0), (10, 0, 20, 10))
    img.paste((0, 0, 255), (20, 0, 30, 10))
    img.save(tmp_path / "wide.png")
    # 6 wide x 18 tall: the middle 6 x 6 is white, top and bottom black
    tall = Image.new("RGB", (6, 18), (0, 0, 0))
    tall.paste((255, 255, 255), (0, 6, 6, 12))
    tall.save(tmp_path / "zz_tall.png")
    images, _, _ = load_image_folder(tmp_path, resolution=5)
    assert images.shape == (2, 3, 5, 5)
    green = torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 5, 5)
    assert torch.allclose(images[0], green)
    assert torch.allclose(images[1], torch.ones(3, 5, 5))


def test_bicubic_upscale_matches_pil(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "noise.png")
    images, _, _ = load_image_folder(tmp_path, resolution=16)
    ref = Image.fromarray(pixels).resize((16, 16), Image.Resampling.BICUBIC)
    expect = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 127.5 - 1.0
    assert torch.allclose(images[0], expect)


def test_grayscale(tmp_path):
    _save(tmp_path / "a" / "rgb.png", (9, 9), (255, 255, 255))
    _save(tmp_path / "b" / "gray.png", (9, 9), 0, mode="L")
    images, labels, classes = load_image_folder(tmp_path, resolution=3, channels=1)
    assert images.shape == (2, 1, 3, 3) and classes == ["a", "b"]
    assert images[0].eq(1.0).all() and images[1].eq(-1.0).all()
    rgb, _, _ = load_image_folder(tmp_path, resolution=3)  # grayscale file as RGB
    assert rgb.shape == (2, 3, 3, 3) and rgb[1].eq(-1.0).all()


def test_mixed_layout(tmp_path):
    _save(tmp_path / "top.png", (4, 4), (0, 0, 0))
    _save(tmp_path / "cls" / "in.png", (4, 4), (0, 0, 0))
    with pytest.raises(DataError, match="mixes images at the top level with class subfolders"):
        load_image_folder(tmp_path, resolution=4)


def test_corrupt_image_is_named(tmp_path):
    _save(tmp_path / "good.png", (4, 4), (0, 0, 0))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(tmp_path, resolution=4)


def test_truncated_image_is_named(tmp_path):
    _save(tmp_path / "cls" / "big.jpg", (64, 64), (100, 150, 200))
    data = (tmp_path / "cls" / "big.jpg").read_bytes()
    (tmp_path / "cls" / "big.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="big.jpg"):
        load_image_folder(tmp_path, resolution=4)


def test_empty_and_missing_folder(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path / "empty", resolution=4)
    with pytest.raises(DataError, match="image folder not found"):
        load_image_folder(tmp_path / "missing", resolution=4)


@pytest.mark.parametrize("resolution, channels", [(0, 3), (2.5, 3), ("x", 3), (8, 2)])
def test_bad_options(tmp_path, resolution, channels):
    _save(tmp_path / "a.png", (4, 4), (0, 0, 0))
    with pytest.raises(DataError):
        load_image_folder(tmp_path, resolution=resolution, channels=channels)
