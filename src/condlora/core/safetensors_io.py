"""Weights files: tagged safetensors (atomic writes, checked reads) and state-dict checks."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


def write_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write tensors and string metadata; temporary file then rename, so no half-written file."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_weights(
    path: str | Path, fmt: str, kind: str, error: type[Exception], tensors: bool = True
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a file tagged `fmt`; `error` if it is missing or not one.

    With tensors=False only the header is read (metadata, empty dict).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{kind} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != fmt:
                raise error(f"{path} is not a {kind}")
            return metadata, ({k: f.get_tensor(k) for k in f.keys()} if tensors else {})
    except SafetensorError as err:  # truncated, damaged or not safetensors at all
        raise error(f"{path} is not a readable {kind}: {err}") from None


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
