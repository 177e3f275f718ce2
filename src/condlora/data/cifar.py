"""CIFAR-10 in its standard python format, read from the folder or straight from the archive.

The batch files are pickles, so they are read with a restricted unpickler that only lets
through the few numpy helpers needed to rebuild a uint8 array; anything else is refused.
"""

import codecs
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from condlora.core.errors import DataError

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
