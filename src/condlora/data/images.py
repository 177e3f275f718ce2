"""Image data sets as tensors: the embedded digits (scikit-learn's 8x8 handwritten digits,
upsampled; no download, they ship with scikit-learn), a folder of images (flat, or one
subfolder per class), and the seeded, stratified train / held-out split of any of them.

CIFAR-10 is read in its standard python format, from the folder or straight from the
archive. The batch files are pickles, so they are read with a restricted unpickler that only
lets through the few numpy helpers needed to rebuild a uint8 array; anything else is refused.
"""

from __future__ import annotations

import codecs
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from sklearn.datasets import load_digits

from condlora.core.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (not hidden), sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _load_image(file: Path, resolution: int, mode: str) -> np.ndarray:
    """One image: convert, center-crop to a square, bicubic-resize -> uint8 (R, R[, C])."""
    try:
        with Image.open(file) as img:
            img = img.convert(mode)
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {file}: {exc}") from None


def folder_layout(path: str | Path) -> tuple[list[Path], torch.Tensor | None, list[str]]:
    """(image files, labels or None, class names) of a flat or class-subfolder image folder."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise DataError(f"image folder {path} is a file: give a folder of images")
    if not path.is_dir():
        raise DataError(
            f"image folder not found at {path}: give a folder of images "
            "(flat, or one subfolder per class)"
        )
    top = _images_in(path)
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_files = {d.name: _images_in(d) for d in subdirs}
    empty = [name for name, files in class_files.items() if not files]
    class_files = {name: files for name, files in class_files.items() if files}
    if class_files and empty:  # a class without images would silently shrink the classes
        raise DataError(
            f"class folders without images in {path}: {', '.join(empty[:5])}"
            f"{' ...' if len(empty) > 5 else ''} ({len(class_files)} others have images): "
            "add images or remove those folders"
        )
    if top and class_files:
        raise DataError(
            f"{path} mixes images at the top level with class subfolders "
            f"({', '.join(sorted(class_files))}): put every image in a class subfolder, "
            "or use a flat folder"
        )
    if not top and not class_files:
        raise DataError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path} or its subfolders: put the "
            "images there (flat, or one subfolder per class)"
        )
    if top:
        return top, None, []
    classes = sorted(class_files)
    files = [f for name in classes for f in class_files[name]]
    index = [i for i, name in enumerate(classes) for _ in class_files[name]]
    return files, torch.tensor(index, dtype=torch.long), classes


def load_image_folder(
    path: str | Path, resolution: int, channels: int = 3
) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """Images as (N, C, R, R) float32 in [-1, 1], labels (N,) long or None, class names.

    A flat folder gives labels None and no class names; a folder of class subfolders gives
    each image the index of its subfolder among the sorted names. Images (png, jpg, jpeg,
    bmp, webp) are converted to RGB or L, center-cropped to a square, bicubic-resized.
    """
    try:
        ok = not isinstance(resolution, bool) and int(resolution) == resolution >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"image folder resolution must be a positive integer, got {resolution!r}")
    resolution = int(resolution)
    if channels not in (1, 3):
        raise DataError(f"image folder channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    mode = "L" if channels == 1 else "RGB"
    files, labels, classes = folder_layout(path)
    pixels = np.stack([_load_image(f, resolution, mode) for f in files])
    if pixels.ndim == 3:  # grayscale: (N, R, R) -> (N, R, R, 1)
        pixels = pixels[..., None]
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
    return images.contiguous(), labels, classes


CAPTIONS_FILE = "metadata.jsonl"  # diffusers' image-folder convention: {"file_name", "text"}


def _metadata_captions(path: Path) -> dict[str, str]:
    """file_name (relative to the folder) -> text of a metadata.jsonl, one JSON object a line."""
    captions = {}
    for n, line in enumerate((path / CAPTIONS_FILE).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[str(Path(row["file_name"]))] = str(row["text"])
        except (ValueError, KeyError, TypeError):
            raise DataError(
                f'{path / CAPTIONS_FILE} line {n}: expected {{"file_name": ..., "text": ...}}'
            ) from None
    return captions


def load_captions(path: str | Path) -> list[str]:
    """The caption of every image of a folder, in `folder_layout`'s order: the folder's
    metadata.jsonl (diffusers' convention) where it names the image, else a .txt with the
    image's stem beside it. DataError naming the images that have neither."""
    path = Path(path).expanduser()
    files = folder_layout(path)[0]
    listed = _metadata_captions(path) if (path / CAPTIONS_FILE).is_file() else {}
    captions, missing = [], []
    for file in files:
        text = listed.get(str(file.relative_to(path)))
        if text is None and file.with_suffix(".txt").is_file():
            text = file.with_suffix(".txt").read_text(encoding="utf-8").strip()
        if text is None:
            missing.append(str(file.relative_to(path)))
        captions.append(text or "")
    if missing:
        raise DataError(
            f"{len(missing)} of {len(files)} images in {path} have no caption (a text model "
            f"needs one): {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; put a "
            f".txt with the image's name beside it or list it in {CAPTIONS_FILE}"
        )
    return captions


NUM_CLASSES = 10


def load_digits_images(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, 1, R, R) float32 in [-1, 1] and (N,) long labels.

    Pixels 0..16 map linearly to [-1, 1]; 8x8 is upsampled to R x R bilinearly
    (align_corners=False, no antialias), which keeps values inside [-1, 1].
    """
    if (
        isinstance(resolution, bool)
        or int(resolution) != resolution
        or resolution % 8
        or resolution < 8
    ):
        raise DataError(f"digits resolution must be a positive multiple of 8, got {resolution}")
    resolution = int(resolution)
    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.float32)[:, None]  # (N, 1, 8, 8)
    images = images / 8.0 - 1.0
    if resolution != 8:
        images = F.interpolate(
            images, size=(resolution, resolution), mode="bilinear", align_corners=False
        )
    labels = torch.from_numpy(digits.target).to(torch.long)
    return images.contiguous(), labels


def stratified_split(
    images: torch.Tensor,
    labels: torch.Tensor,
    holdout: int = 297,
    seed: int = 0,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Stratified random split -> ((train_x, train_y), (hold_x, hold_y)); digits: 1500/297.

    Each class gives holdout * n_class / N held-out images (largest remainders round, ties to
    the lower class), drawn with a seeded torch.Generator; both parts keep the input order.
    """
    n = len(labels)
    if len(images) != n:
        raise DataError(f"{len(images)} images but {n} labels")
    if not 0 <= holdout <= n:
        raise DataError(f"holdout must be in [0, {n}], got {holdout}")
    labels = labels.long()
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * holdout / n
    take = quota.floor().long()
    remainder = holdout - int(take.sum())
    order = sorted(range(len(classes)), key=lambda i: (-(quota[i] - take[i]).item(), i))
    for i in order[:remainder]:
        take[i] += 1

    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(n, dtype=torch.bool)
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        members = torch.nonzero(labels == c).flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[:k]]
        held[chosen] = True
    return (images[~held], labels[~held]), (images[held], labels[held])


CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
_PIXELS = 3 * 32 * 32


def _numpy_reconstruct() -> object:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_frombuffer() -> object:
    try:
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy < 2
        from numpy.core.numeric import _frombuffer
    return _frombuffer


# (module, name) -> how to get the object; nothing outside this table can be loaded.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1")
    ("_codecs", "encode"): lambda: codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only builds numpy arrays (and plain containers)."""

    def __init__(self, file: io.BufferedIOBase, where: str) -> None:
        super().__init__(file, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> object:
        """Return an allowed numpy helper; refuse every other global with DataError."""
        get = _ALLOWED.get((module, name))
        if get is None:
            raise DataError(
                f"{self.where} is not a CIFAR-10 batch: its pickle asks for {module}.{name}, "
                "which is refused; re-download cifar-10-python.tar.gz from " + CIFAR10_URL
            )
        return get()


def _load_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle and validate one batch file -> (uint8 (n, 3072), int64 (n,))."""
    try:
        batch = _RestrictedUnpickler(io.BytesIO(data), where).load()
    except DataError:
        raise
    except Exception as exc:  # truncated or garbled pickles raise all sorts of errors
        raise DataError(
            f"{where} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}); "
            f"re-download cifar-10-python.tar.gz from {CIFAR10_URL}"
        ) from None
    if not isinstance(batch, dict):
        raise DataError(f"{where} holds a {type(batch).__name__}, not a CIFAR-10 batch dict")
    images = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if images is None or labels is None:
        raise DataError(f"{where} lacks the b'data' or b'labels' key of a CIFAR-10 batch")
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 2
        or images.shape[1] != _PIXELS
    ):
        shape = getattr(images, "shape", type(images).__name__)
        dtype = getattr(images, "dtype", "?")
        raise DataError(
            f"{where}: data must be a uint8 array of shape (N, {_PIXELS}), got {shape} {dtype}"
        )
    try:
        labels = np.asarray(labels)
    except Exception:
        raise DataError(f"{where}: labels are not a list of integers") from None
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{where}: labels must be a flat list of integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if len(labels) != len(images):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(
            f"{where}: labels must be in 0..9, got {int(labels.min())}..{int(labels.max())}"
        )
    return images, labels


def _read_folder(folder: Path, names: tuple[str, ...]) -> list[tuple[bytes, str]]:
    """Read the named batch files from an extracted cifar-10-batches-py folder."""
    out = []
    for name in names:
        file = folder / name
        if not file.is_file():
            raise DataError(
                f"CIFAR-10 batch file {file} is missing: extract cifar-10-python.tar.gz "
                f"(from {CIFAR10_URL}) again and give the cifar-10-batches-py folder"
            )
        try:
            out.append((file.read_bytes(), str(file)))
        except OSError as exc:
            raise DataError(f"cannot read CIFAR-10 batch file {file}: {exc.strerror}") from None
    return out


def _read_archive(archive: Path, names: tuple[str, ...]) -> list[tuple[bytes, str]]:
    """Read the named batch files straight out of cifar-10-python.tar.gz (no extraction)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {}
            for member in tar.getmembers():
                if member.isfile():
                    members.setdefault(member.name.rsplit("/", 1)[-1], member)
            out = []
            for name in names:
                member = members.get(name)
                if member is None:
                    raise DataError(
                        f"{archive} has no {name}: expected cifar-10-python.tar.gz from "
                        f"{CIFAR10_URL} (members cifar-10-batches-py/{name} etc.)"
                    )
                handle = tar.extractfile(member)
                out.append((handle.read(), f"{archive}:{member.name}"))
            return out
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(
            f"{archive} is not a readable cifar-10-python.tar.gz ({type(exc).__name__}: {exc}); "
            f"re-download it from {CIFAR10_URL}"
        ) from None


def load_cifar10(path: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 as (N, 3, 32, 32) float32 in [-1, 1] and (N,) long labels; split train|test.

    `path` is the extracted cifar-10-batches-py folder or the cifar-10-python.tar.gz archive;
    "train" is data_batch_1..5 (50,000 images), "test" is test_batch (10,000). Bytes 0..255 map
    linearly to [-1, 1].
    """
    if split == "train":
        names = TRAIN_FILES
    elif split == "test":
        names = TEST_FILES
    else:
        raise DataError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / names[0]).exists() and (path / "cifar-10-batches-py").is_dir():
            path = path / "cifar-10-batches-py"  # the folder the archive was extracted into
        files = _read_folder(path, names)
    elif path.is_file():
        files = _read_archive(path, names)
    else:
        raise DataError(
            f"CIFAR-10 not found at {path}: download cifar-10-python.tar.gz from {CIFAR10_URL} "
            "and give its path (or the extracted cifar-10-batches-py folder)"
        )
    batches = [_load_batch(data, where) for data, where in files]
    images = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b[1] for b in batches])
    images = torch.from_numpy(images).to(torch.float32) / 127.5 - 1.0
    return images.contiguous(), torch.from_numpy(labels).to(torch.long)
