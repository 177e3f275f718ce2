"""weights2weights' collection -> a condlora dataset file (`condlora synth import-w2w`).

weights2weights (Dravid et al. 2024, github.com/snap-research/weights2weights) ships about
65,000 identity LoRAs for Stable Diffusion 1.5 as one float tensor, `all_weights.pt` [N, D],
one row per identity, and `weight_dimensions.pt`, a dict in row order:
    kohya-style key (`lora_unet_<module stem>.lora_A.weight` / `.lora_B.weight`)
        -> ((numel,), shape)
A row is those tensors flattened and laid end to end in the dict's order. Without the dict
the layout follows from the U-Net (`--base-modules` config.json): rank 1 on every
attention's `to_q` and `to_v`, modules in the U-Net's order with the mid block moved
between the down and the up blocks (down, mid, up), each module's A [r, in] then B [out, r]:
D = 99,648 for SD 1.5. w2w applies its LoRAs with alpha 27 (scale alpha / r).

Both files are read with torch.load(weights_only=True, mmap=True): no pickled code runs and
the big tensor stays on disk; rows are read a chunk at a time (plain file reads from the
archive member that holds them, so that resident memory stays at a chunk, where the file is
torch.save's plain zip; else through the memory map), their columns put into the
collection's layout (FlatSpec: modules sorted, A then B) and the scale alpha / r folded into
B, as `collect` folds every scale. The numbers are kept otherwise (no canonical form, no
alignment: the dataset's alignment is "none").
"""

from __future__ import annotations

import math
import os
import re
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from condlora.core.errors import DataError
from condlora.core.reporting import progress_bar
from condlora.core.safetensors_io import load_torch_weights_only
from condlora.lora.formats import BaseModules, LoRAWeights, make_module
from condlora.lora.formats.keys import ParsedKey, parse_key
from condlora.lora.formats.kohya import resolve, stem_table
from condlora.synthesis.collection import (
    CHUNK_BYTES,
    check_dataset_path,
    load_embeddings,
    write_dataset,
)
from condlora.synthesis.flatten import FlatSpec

W2W_ALPHA = 27.0  # the alpha w2w applies its rank-1 LoRAs with
W2W_TARGETS = ("to_q", "to_v")
DATA_MEMBER = re.compile(r"(^|/)data/\d+$")  # a tensor storage in a torch.save archive
BLOCK_ORDER = ("down_blocks", "mid_block", "up_blocks")  # w2w's module order
# a U-Net attention projection's kohya stem, as w2w names its modules
ATTENTION_STEM = re.compile(
    r"^(down_blocks_\d+|up_blocks_\d+|mid_block)_attentions_(\d+)_transformer_blocks_(\d+)_"
    r"(attn\d)_(to_q|to_k|to_v|to_out_0)$"
)


@dataclass(frozen=True)
class Part:
    """One tensor of a w2w row: its module, factor (A or B) and shape, in row order."""

    module: str
    factor: str
    shape: tuple[int, ...]


def _stem_module(parsed: ParsedKey, table: dict[str, list[str]] | None, where: str) -> str:
    """The dotted U-Net path of a key's module."""
    if parsed.naming == "dotted":
        return parsed.module
    if table is not None:
        return resolve(parsed.module, table, where)
    m = ATTENTION_STEM.match(parsed.module)
    if m is None:
        raise DataError(
            f"{where}: module {parsed.module} is not a U-Net attention projection; give the "
            "base model's modules (--base-modules) to map its name"
        )
    block, attention, transformer, attn, proj = m.groups()
    block = block.replace("_blocks_", "_blocks.")
    proj = proj.replace("to_out_0", "to_out.0")
    return f"{block}.attentions.{attention}.transformer_blocks.{transformer}.{attn}.{proj}"


def _dims_entry(key: object, value: object, where: str) -> tuple[str, tuple[int, ...]]:
    """(key, shape) of one weight_dimensions entry ((numel,), shape), checked."""
    try:
        (numel,), shape = value
        shape = tuple(int(s) for s in shape)
        numel = int(numel)
    except (TypeError, ValueError):
        raise DataError(f"{where}: entry {key!r} is not ((numel,), shape)") from None
    if not isinstance(key, str):
        raise DataError(f"{where}: key {key!r} is not a string")
    if numel != math.prod(shape):
        raise DataError(f"{where}: entry {key!r} has {numel} numbers but shape {shape}")
    return key, shape


def parts_from_dims(dims: object, base: BaseModules | None, where: str) -> list[Part]:
    """The row layout that a weight_dimensions dict describes (module names as the U-Net's)."""
    if not isinstance(dims, dict) or not dims:
        raise DataError(f"{where} does not hold a dict of key -> ((numel,), shape)")
    table = stem_table(base) if base is not None else None
    parts = []
    for key, value in dims.items():
        key, shape = _dims_entry(key, value, where)
        parsed = parse_key(key)
        if not isinstance(parsed, ParsedKey) or parsed.role not in ("A", "B"):
            raise DataError(f"{where}: key {key!r} is not a LoRA factor")
        parts.append(Part(_stem_module(parsed, table, where), parsed.role, shape))
    return parts


def parts_from_unet(base: BaseModules, rank: int = 1) -> list[Part]:
    """The row layout of rank-`rank` LoRAs on every to_q / to_v of a U-Net, in w2w's order."""
    names = [
        n
        for n, shape in base.items()
        if n.rsplit(".", 1)[-1] in W2W_TARGETS and shape is not None and len(shape) == 2
    ]
    if not names:
        raise DataError("the base model has no attention to_q / to_v projections")
    block = lambda n: next((i for i, b in enumerate(BLOCK_ORDER) if n.startswith(b)), 3)  # noqa: E731
    parts = []
    for name in sorted(names, key=block):  # stable: each block's own order kept
        out, inp = base[name]
        parts += [Part(name, "A", (rank, inp)), Part(name, "B", (out, rank))]
    return parts


def layout(parts: list[Part], where: str) -> tuple[FlatSpec, Tensor]:
    """(the collection's spec, source column of each of its columns) for a row layout."""
    factors: dict[str, dict[str, tuple[tuple[int, ...], int]]] = {}
    offset = 0
    for p in parts:
        if p.factor in factors.setdefault(p.module, {}):
            raise DataError(f"{where}: module {p.module} has two {p.factor} factors")
        factors[p.module][p.factor] = (p.shape, offset)
        offset += math.prod(p.shape)
    modules = {}
    for name, f in factors.items():
        if set(f) != {"A", "B"}:
            raise DataError(f"{where}: module {name} has no {'B' if 'A' in f else 'A'} factor")
        zeros = [torch.zeros(f[k][0]) for k in ("A", "B")]
        modules[name] = make_module(name, *zeros, 1.0, where)
    spec = FlatSpec.of(LoRAWeights(modules))
    source = [
        torch.arange(factors[e.module][e.factor][1], factors[e.module][e.factor][1] + e.size)
        for e in spec.entries
    ]
    return spec, torch.cat(source)


def _data_offset(path: Path, weights: Tensor) -> int | None:
    """Where the tensor's first number lies in its torch.save file (a zip archive), when the
    archive holds it as one stored member, row after row; None otherwise."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = [i for i in archive.infolist() if DATA_MEMBER.search(i.filename)]
    except (zipfile.BadZipFile, OSError):
        return None
    if len(data) != 1 or not weights.is_contiguous():
        return None
    member = data[0]
    if member.compress_type != zipfile.ZIP_STORED:
        return None
    if member.file_size != weights.untyped_storage().nbytes():
        return None
    with open(path, "rb") as f:  # the local file header: 30 bytes, then name and extra field
        f.seek(member.header_offset)
        head = f.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        return None
    name_length, extra_length = struct.unpack("<HH", head[26:30])
    start = member.header_offset + 30 + name_length + extra_length
    return start + weights.storage_offset() * weights.element_size()


def _row_blocks(path: Path, weights: Tensor, rows: int) -> Iterator[Tensor]:
    """The tensor's rows, `rows` at a time: read with plain file reads where the file allows
    (resident memory stays at one block), else through the memory map."""
    offset = _data_offset(path, weights)
    if offset is None:
        for start in range(0, len(weights), rows):
            yield weights[start : start + rows]
        return
    row_bytes = weights.shape[1] * weights.element_size()
    with open(path, "rb") as f:
        f.seek(offset)
        for start in range(0, len(weights), rows):
            count = min(rows, len(weights) - start)
            block = bytearray(count * row_bytes)
            if f.readinto(block) != len(block):
                raise DataError(f"{path} ended before row {start + count} (truncated?)")
            yield torch.frombuffer(block, dtype=weights.dtype).reshape(count, -1)


def _chunks(
    blocks: Iterator[Tensor], spec: FlatSpec, source: Tensor, alpha: float
) -> Iterator[np.ndarray]:
    """The rows in the spec's layout, a block at a time, the scale alpha / r folded into B."""
    start = 0
    for block in blocks:
        chunk = block.index_select(1, source).float().numpy()
        for e in spec.entries:
            if e.factor == "B":  # B [out, r]: scale alpha / r (in place)
                chunk[:, e.offset : e.offset + e.size] *= alpha / e.shape[1]
        bad = np.flatnonzero(~np.isfinite(chunk).all(axis=1))
        if len(bad):
            raise DataError(f"row {start + bad[0]} of the collection has NaN or inf values")
        start += len(chunk)
        yield chunk


def import_w2w(
    weights_path: str | os.PathLike,
    out: str | os.PathLike,
    dims: str | os.PathLike | None = None,
    base_modules: BaseModules | None = None,
    alpha: float = W2W_ALPHA,
    embeddings: str | os.PathLike | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool = False,
) -> tuple[Path, int, int]:
    """all_weights.pt (+ weight_dimensions.pt, or the U-Net's modules) -> a dataset file;
    returns (path, rows, width). Rows are named w2w_00000, w2w_00001, ..."""
    out = Path(out)
    check_dataset_path(out)
    if not (math.isfinite(alpha) and alpha > 0):
        raise DataError(f"--alpha must be a finite number > 0, got {alpha}")
    if dims is not None:
        parts = parts_from_dims(
            load_torch_weights_only(dims, "weight dimensions file", mmap=True),
            base_modules,
            str(dims),
        )
        what = Path(dims).name
    elif base_modules is not None:
        parts, what = parts_from_unet(base_modules), "the U-Net's to_q / to_v at rank 1"
    else:
        raise DataError("give --dims weight_dimensions.pt or --base-modules (the U-Net's layout)")
    spec, source = layout(parts, str(dims or "the U-Net"))
    weights = load_torch_weights_only(weights_path, "weights file", mmap=True)
    if not isinstance(weights, Tensor) or weights.dim() != 2 or not weights.is_floating_point():
        kind = f"a {weights.dim()}-d tensor" if isinstance(weights, Tensor) else "no tensor"
        raise DataError(f"{weights_path} holds {kind}: expected one 2-d float tensor [N, D]")
    if weights.shape[1] != spec.size:
        raise DataError(
            f"{weights_path} has rows of {weights.shape[1]} numbers but {what} lays out {spec.size}"
        )
    n = len(weights)
    names = [f"w2w_{i:0{len(str(n - 1))}d}" for i in range(n)]
    emb = load_embeddings(embeddings, names) if embeddings is not None else None
    rows = max(1, chunk_bytes // (4 * spec.size))
    blocks = _row_blocks(Path(weights_path), weights, rows)
    with progress_bar(progress, total=n, unit="row", desc="import-w2w") as bar:
        write_dataset(out, names, spec, _chunks(_counted(blocks, bar), spec, source, alpha), emb)
    return out, n, spec.size


def _counted(blocks: Iterator[Tensor], bar: tqdm) -> Iterator[Tensor]:
    """The blocks as they are, each counted on the progress bar once it has been read."""
    for block in blocks:
        yield block
        bar.update(len(block))
