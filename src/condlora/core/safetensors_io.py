"""Weights files: tagged safetensors (atomic writes, checked reads) and state-dict checks.

Reads check the file before any tensor is read: the header length against the file size,
the header as JSON, every tensor's dtype, shape and byte range against the data section
(which lies inside the file). So a damaged or hostile file is refused in one line naming
it, and a read never allocates more than the file's size.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from condlora.core.errors import CondloraError, DataError
from condlora.core.files import replace_atomically

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
# bytes per element of the dtypes that torch reads (safetensors' names)
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def write_weights(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict, sync: bool = False
) -> None:
    """Write tensors and string metadata; temporary file then rename, so no half-written file.

    On any failure the temporary file is removed and the old file (if any) is untouched;
    a path that cannot be written raises CondloraError. `sync`: flushed to disk (checkpoints).
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    replace_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), sync)


def _fail(error: type[Exception], path: Path, why: str) -> Exception:
    return error(f"{path} is not a readable safetensors file: {why}")


def _check_entry(name: str, entry: object, data_size: int) -> tuple[int, int]:
    """(begin, end) of one tensor's bytes; ValueError saying what is wrong with its entry."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"tensor '{name}' has a malformed entry")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"tensor '{name}' has an unsupported dtype {dtype!r}")
    ints = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
    if not ints:
        raise ValueError(f"tensor '{name}' has a bad shape {shape!r}")
    pair = isinstance(offsets, list) and len(offsets) == 2
    if not pair or not all(type(o) is int for o in offsets):
        raise ValueError(f"tensor '{name}' has bad data offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise ValueError(f"tensor '{name}' lies outside the file (offsets {offsets})")
    if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise ValueError(f"tensor '{name}': {end - begin} bytes do not hold {dtype} {shape}")
    return begin, end


def _parse_header(raw: bytes, data_size: int) -> tuple[dict[str, str], dict[str, dict]]:
    """(metadata, tensor entries) of a JSON header; ValueError saying what is wrong."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("its header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("its __metadata__ is not a mapping of strings")
    ranges = sorted(_check_entry(name, entry, data_size) for name, entry in header.items())
    covered = 0
    for begin, end in ranges:  # the tensors tile the data section, as safetensors requires
        if begin != covered:
            raise ValueError("tensor byte ranges overlap or leave gaps")
        covered = end
    if covered != data_size:
        raise ValueError(f"the data section has {data_size} bytes, the tensors {covered}")
    return metadata, header


def read_header(
    path: str | Path, kind: str = "safetensors file", error: type[Exception] = CondloraError
) -> tuple[dict[str, str], dict[str, dict]]:
    """(metadata, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file, checked.

    `error` (naming the file and what is wrong) if it is missing, not a file, or damaged.
    """
    path = Path(path)
    if not path.exists():
        raise error(f"{kind} not found: {path}")
    if not path.is_file():
        raise error(f"{path} is a folder, not a {kind}")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _fail(error, path, f"{size} bytes, too short for a header")
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise _fail(error, path, f"header length {length} exceeds the file ({size} bytes)")
            raw = f.read(length)
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return _parse_header(raw, size - 8 - length)
    except ValueError as err:
        raise _fail(error, path, str(err)) from None


def check_finite(
    tensors: Mapping[str, torch.Tensor], where: str, error: type[Exception] = CondloraError
) -> None:
    """`error` naming the first floating-point tensor with a NaN or inf value."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise error(f"{where}: tensor {name} holds NaN or inf values")


def read_weights(
    path: str | Path,
    fmt: str | None,
    kind: str,
    error: type[Exception],
    tensors: bool = True,
    finite: bool = True,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a file tagged `fmt`; `error` if it is missing or not one.

    With tensors=False only the header is read (metadata, empty dict). fmt None accepts any
    tag. With finite=True a floating-point tensor holding NaN or inf is refused.
    """
    path = Path(path)
    metadata, _ = read_header(path, kind, error)
    if fmt is not None and metadata.get("format") != fmt:
        raise error(f"{path} is not a {kind} (format {metadata.get('format')!r}, not {fmt!r})")
    if not tensors:
        return metadata, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _fail(error, path, reason) from None
    if finite:
        check_finite(out, str(path), error)
    return metadata, out


def describe_mismatch(
    expected: Mapping[str, torch.Tensor],
    given: Mapping[str, torch.Tensor],
    optional: Iterable[str] = (),
) -> str:
    """'' if `given` has exactly the keys and shapes of `expected`, else what differs.

    Keys in `optional` may be absent. At most three keys are named per kind of problem.
    """
    optional = set(optional)
    missing = [k for k in expected if k not in given and k not in optional]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in given.items()
        if k in expected and v.shape != expected[k].shape
    ]
    groups = (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes))
    return "; ".join(
        f"{label} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
        for label, keys in groups
        if keys
    )


def load_state_checked(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    where: str,
    error: type[Exception] = CondloraError,
    skip: AbstractSet[str] = frozenset(),
) -> None:
    """load_state_dict after checking keys and shapes: `error` in one line if they differ.
    `skip`: keys the module holds already and the state leaves out (a frozen pretrained base)."""
    expected = {k: v for k, v in module.state_dict().items() if k not in skip}
    problems = describe_mismatch(expected, state)
    if problems:
        raise error(f"{where} does not fit the model: {problems}")
    module.load_state_dict(state, strict=not skip)


def load_torch_weights_only(path: str | os.PathLike, what: str, mmap: bool = False) -> object:
    """A foreign .pt file's content (weights2weights' collection, MTCNN's nets), read with
    torch's weights-only unpickler (no pickled code runs), memory-mapped with `mmap`;
    DataError in one line for a missing, refused or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise DataError(
            f"{path}: refused, it holds Python objects other than tensors, numbers and "
            "containers (read weights-only, no pickled code is run)"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path} is not a readable torch file ({first})") from None
