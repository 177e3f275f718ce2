"""safetensors files tagged with a format name: atomic writes, checked reads, metadata alone."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
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
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != fmt:
            raise error(f"{path} is not a {kind}")
        return metadata, ({k: f.get_tensor(k) for k in f.keys()} if tensors else {})
