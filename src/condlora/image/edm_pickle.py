"""EDM's network pickles, read as data: nothing in the file is run.

EDM (`torch_utils.persistence`) pickles every network module together with the source code
of its Python module. Unpickling one calls
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, which would execute
`meta["module_src"]` and fill a new object with `meta["state"]` (the module's `__dict__`:
`_parameters`, `_buffers`, `_modules`, ...). Here that call becomes a `Record` of the class
name and the state, and the source stays an unread string. torch's own module classes
(`ModuleDict` between EDM's blocks) become records too. Tensors are rebuilt from their
storages, each read by `torch.load(..., weights_only=True)`. The few other globals allowed
are data containers (`ALLOWED` lists them); any other global is refused with one line.
"""

from __future__ import annotations

import collections
import io
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from condlora.core.errors import CondloraError


class Refused(CondloraError):
    """The file asks for something that reading it as data cannot allow."""


class Record:
    """A pickled object kept as data: its class name and its state, never its code."""

    class_name = "?"

    def __init__(self, class_name: str, state: dict) -> None:
        self.class_name = class_name
        self.state = state

    def __setstate__(self, state: Any) -> None:
        """pickle's BUILD for torch's own classes: keep the state as it is."""
        self.state = state

    @property
    def short_name(self) -> str:
        """The class name without its module path."""
        return self.class_name.rsplit(".", 1)[-1]


_RECORD_CLASSES: dict[str, type[Record]] = {}


def _record_class(module: str, name: str) -> type[Record]:
    """A Record subclass standing in for the torch class `module.name` (pickle's NEWOBJ)."""
    full = f"{module}.{name}"
    if full not in _RECORD_CLASSES:
        _RECORD_CLASSES[full] = type(f"Record_{name}", (Record,), {"class_name": full})
    return _RECORD_CLASSES[full]


def _persistent_record(meta: Any) -> Record:
    """Stands in for EDM's `_reconstruct_persistent_obj`: the recorded state, source not run."""
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
        raise Refused("an EDM persistent object without its recorded state")
    if meta.get("type") != "class":
        raise Refused(f"an EDM persistent object of type {meta.get('type')!r}")
    return Record(str(meta.get("class_name")), meta["state"])


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Record:
    """copyreg._reconstructor (pickle protocols 0 and 1) for the record classes only."""
    if not (isinstance(cls, type) and issubclass(cls, Record) and base is object):
        raise Refused(f"copyreg._reconstructor of {cls!r}")
    return cls.__new__(cls)


def _storage_from_bytes(data: Any) -> torch.storage.TypedStorage:
    """torch.storage._load_from_bytes, but through torch's weights-only unpickler."""
    if not isinstance(data, bytes):
        raise Refused("a tensor storage that is not bytes")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it did not write
            warnings.simplefilter("ignore")
            storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch's unpickler refused it or the bytes are broken
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise Refused(f"a tensor storage torch's weights-only loader refuses ({first})") from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise Refused(f"a tensor storage that loads as {type(storage).__name__}")
    return storage


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    """torch._utils._rebuild_tensor(_v2): a tensor viewing a storage (no hooks, no grad)."""
    ints = isinstance(offset, int) and all(
        isinstance(v, tuple) and all(isinstance(i, int) for i in v) for v in (size, stride)
    )
    if not isinstance(storage, torch.storage.TypedStorage) or not ints:
        raise Refused("a tensor whose storage, size or stride is not plain data")
    try:
        return torch._utils._rebuild_tensor(storage, offset, size, stride).detach()
    except RuntimeError as err:
        raise Refused(f"a tensor that does not fit its storage ({err})") from None


def _parameter(data: Any, *_ignored: Any) -> torch.Tensor:
    """torch._utils._rebuild_parameter(_with_state): the parameter's data tensor."""
    if not isinstance(data, torch.Tensor):
        raise Refused("a parameter that is not a tensor")
    return data


def _typed_tensor(func: Any, new_type: Any, args: Any, state: Any) -> torch.Tensor:
    """torch._tensor._rebuild_from_type_v2 for plain tensors: func must be a tensor rebuild."""
    if func not in (_tensor, _parameter) or not isinstance(args, tuple):
        raise Refused(f"a tensor rebuilt by {func!r}")
    return func(*args)


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """_codecs.encode as pickle protocol 2 writes bytes: latin-1 text only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Refused(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _numpy_dtype(name: Any, *_flags: Any) -> np.dtype:
    """numpy.dtype for numbers only (bool, int, uint, float, complex)."""
    dtype = np.dtype(str(name))
    if dtype.kind not in "biufc":
        raise Refused(f"numpy dtype {name!r}")
    return dtype


def _numpy_scalar(dtype: Any, data: Any) -> int | float | complex | bool:
    """numpy's scalar reconstructor for numbers: the value as a Python number."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, bytes):
        raise Refused("a numpy scalar that is not a number")
    return np.frombuffer(data, dtype=dtype)[0].item()


class _EasyDict(dict):
    """dnnlib.util.EasyDict as a plain dict (its attributes are its items)."""

    def __setstate__(self, state: Any) -> None:
        """Nothing to restore: the items came through SETITEMS."""


ALLOWED: dict[tuple[str, str], Callable] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_tensor"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _typed_tensor,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _latin1,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("dnnlib.util", "EasyDict"): _EasyDict,
}
RECORDED_MODULES = "torch.nn.modules."  # torch's module classes (ModuleDict, ...): records
PYTHON2_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # pickle protocols 0-2


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `ALLOWED` globals, torch.nn classes as records."""

    def find_class(self, module: str, name: str) -> Any:
        """The allowed stand-in for module.name; Refused for anything else."""
        module = PYTHON2_NAMES.get(module, module)
        target = ALLOWED.get((module, name))
        if target is not None:
            return target
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith(RECORDED_MODULES) and name.isidentifier():
            return _record_class(module, name)
        raise Refused(
            f"the pickle asks for {module}.{name}, which is not a tensor, a container or an "
            "EDM network record"
        )

    def persistent_load(self, pid: Any) -> Any:
        """EDM's pickles use no persistent ids."""
        raise Refused("the pickle uses persistent ids (torch.save's format, not EDM's pickle)")


def load_edm_pickle(path: str | Path) -> Any:
    """The object in an EDM pickle, persistent modules as `Record`s; nothing is run."""
    path = Path(path)
    if not path.is_file():
        raise CondloraError(f"EDM pickle not found: {path}")
    try:
        with path.open("rb") as f:
            return RestrictedUnpickler(f).load()
    except Refused as err:
        raise CondloraError(f"{path}: refused, nothing in it was run: {err}") from None
    except Exception as err:  # a broken or foreign file: truncated, wrong opcodes, bad args
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CondloraError(f"{path} is not a readable EDM pickle: {first}") from None


def module_tensors(record: Record, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and buffers of a recorded module tree by dotted name (None entries skipped)."""
    state = record.state
    if not isinstance(state, dict):
        raise CondloraError(f"module {prefix or record.class_name} has no recorded state")
    out: dict[str, torch.Tensor] = {}
    for kind in ("_parameters", "_buffers"):
        for name, value in (state.get(kind) or {}).items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise CondloraError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            out[f"{prefix}{name}"] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, Record):
            raise CondloraError(f"{prefix}{name} is a {type(child).__name__}, not a module")
        out.update(module_tensors(child, f"{prefix}{name}."))
    return out
