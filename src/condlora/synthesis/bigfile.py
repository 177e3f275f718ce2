"""safetensors files larger than memory: written in pieces, read memory-mapped or in chunks.

The format: 8-byte little-endian header length, a JSON header (name -> dtype, shape,
data_offsets; `__metadata__` -> strings), then the raw little-endian data. We declare every
tensor up front, then stream the bytes in the declared order.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

from condlora.core.errors import DataError
from condlora.core.safetensors_io import read_header as checked_header

DTYPE = np.dtype("<f4")  # every tensor of the datasets is float32
DTYPE_NAME = "F32"
DTYPE_NAMES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16"}  # what StreamWriter writes


class StreamWriter:
    """Write float tensors (float32, or float16 with `dtype`) whose shapes are known up front,
    their data in pieces.

    The file is written to a temporary name and renamed into place only when every declared
    byte has arrived (`close`); on an exception inside `with`, the temporary file is removed.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tensors: Sequence[tuple[str, tuple[int, ...]]],
        metadata: dict,
        dtype: np.dtype | type = DTYPE,
    ) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        header: dict = {"__metadata__": metadata}
        offset = 0
        for name, shape in tensors:
            size = math.prod(shape) * self.dtype.itemsize
            header[name] = {
                "dtype": DTYPE_NAMES[self.dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        self.total, self.written = offset, 0
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.file = open(self.tmp, "wb")  # noqa: SIM115  closed in close() / abort()
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, array: np.ndarray) -> None:
        """Append the next values (any shape, in C order; converted to the file's dtype)."""
        data = np.ascontiguousarray(array, dtype=self.dtype)
        if self.written + data.nbytes > self.total:
            raise DataError(f"{self.path}: more data than the declared tensors hold")
        self.file.write(memoryview(data.reshape(-1)).cast("B"))  # no copy of the data
        self.written += data.nbytes

    def close(self) -> None:
        """Finish the file and rename it into place."""
        if self.written != self.total:
            self.abort()
            raise DataError(f"{self.path}: {self.written} of {self.total} data bytes written")
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the temporary file; the destination is left as it was."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def read_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """(metadata, tensor entries, data start) of a safetensors file, checked like weights."""
    metadata, entries = checked_header(path, "dataset", DataError)
    data_size = max((entry["data_offsets"][1] for entry in entries.values()), default=0)
    return metadata, entries, Path(path).stat().st_size - data_size


def tensor_info(entries: dict, name: str, path: str | os.PathLike) -> tuple[tuple[int, ...], int]:
    """(shape, data offset) of a float32 tensor in a header; DataError if absent or not F32."""
    entry = entries.get(name)
    if entry is None or entry["dtype"] != DTYPE_NAME:
        raise DataError(f"{path} has no float32 tensor {name!r}")
    return tuple(entry["shape"]), entry["data_offsets"][0]
