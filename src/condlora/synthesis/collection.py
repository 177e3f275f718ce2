"""LoRA collections as datasets: one canonical vector per LoRA in an N x D safetensors matrix.

`collect` reads a folder of LoRAs (any layout, mixed), keeps those that share the most
common set of modules and shapes (intruders are skipped with a reason), and streams their
canonical, flattened vectors to disk in chunks, with per-coordinate mean and std from the
same single pass. `LoRADataset` opens the file memory-mapped, so neither side needs the
matrix in memory. Three passes over the LoRA files, one LoRA in memory at a time: read every
file (signatures), build the collection's alignment reference (`alignment.py`), write.

Dataset file (safetensors, all float32):
    vectors [N, D]   canonical LoRAs (scale folded), layout in metadata["spec"], their pairs
                     rotated to the reference (metadata["alignment"] "reference") or with
                     the per-LoRA sign rule only ("none")
    mean [D], std [D]   per coordinate over the N rows (population std)
    reference [D]    with alignment "reference": the reference factors, a vector in the layout
    embeddings [N, E]   optional: the condition of each LoRA, row-aligned with vectors
    metadata: format, names (JSON list), spec (JSON), skipped (JSON list of [name, reason]),
              alignment ("reference" | "none"; absent in files from before alignment: "none")
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from condlora.core.errors import DataError, LoRAError
from condlora.core.files import check_output_file
from condlora.lora.canonical import canonicalize
from condlora.lora.formats import BaseMismatch, LoRAWeights, read_lora
from condlora.lora.formats.files import as_base_modules
from condlora.lora.formats.svd import choose_rank, lowrank
from condlora.synthesis.bigfile import StreamWriter, read_header, tensor_info
from condlora.synthesis.flatten import FlatSpec, ReferenceBuilder, align

FORMAT = "condlora.lora_dataset"
CHUNK_BYTES = 8 << 20  # rows buffered before each write (and statistics update)
LORA_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "pytorch_lora_weights.safetensors",
)

Signature = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # module -> (A shape, B shape)


@dataclass
class CollectReport:
    """What `collect` wrote and what it left out."""

    path: Path
    taken: list[str]
    skipped: list[tuple[str, str]]  # (name, reason)
    dim: int
    refit: list[str] = field(default_factory=list)  # taken at the collection's rank by SVD


def find_loras(folder: str | os.PathLike) -> list[tuple[str, Path]]:
    """(name, path) of every LoRA in a folder: *.safetensors files and LoRA folders, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"LoRA folder not found: {folder}")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        is_lora_dir = path.is_dir() and any((path / n).exists() for n in LORA_FILES)
        if not (is_lora_dir or (path.is_file() and path.suffix == ".safetensors")):
            continue
        name = path.name if path.is_dir() else path.stem
        if name in found:
            raise DataError(f"{folder}: two LoRAs are named {name!r} ({found[name]}, {path})")
        found[name] = path
    return list(found.items())


def signature(weights: LoRAWeights) -> Signature:
    """The modules and factor shapes of a LoRA (what must agree across a collection)."""
    return {n: (tuple(m.A.shape), tuple(m.B.shape)) for n, m in weights.modules.items()}


def intruder_reason(sig: Signature, ref: Signature) -> str | None:
    """Why a LoRA does not belong with the reference one, or None if it does."""
    missing, extra = sorted(set(ref) - set(sig)), sorted(set(sig) - set(ref))
    if missing or extra:
        parts = [
            f"{len(v)} {w} (e.g. {v[0]})" for v, w in ((missing, "missing"), (extra, "extra")) if v
        ]
        return "other target modules: " + ", ".join(parts)
    for name in sorted(ref):
        (a, b), (ref_a, ref_b) = sig[name], ref[name]
        if a[0] != ref_a[0]:
            return f"other rank: {a[0]} instead of {ref_a[0]} (module {name})"
        if (a, b) != (ref_a, ref_b):
            shape, ref_shape = (b[0], *a[1:]), (ref_b[0], *ref_a[1:])
            return f"other base model: module {name} is {shape} instead of {ref_shape}"
    return None


def ranks_only(sig: Signature, ref: Signature) -> bool:
    """True when two signatures differ in their modules' ranks only (same modules, same
    dW shapes)."""
    if set(sig) != set(ref):
        return False
    dw = lambda a, b: (b[0], *a[1:], *b[2:])  # noqa: E731  dW's shape from (A, B) shapes
    return all(dw(*sig[name]) == dw(*ref[name]) for name in ref)


def at_ranks(weights: LoRAWeights, ranks: dict[str, int], where: str) -> LoRAWeights:
    """The LoRA with each module of another rank re-factorised from its exact dW at the
    collection's rank r: exact when dW has rank <= r (numerically), a DataError otherwise."""
    modules = {}
    for name, m in weights.modules.items():
        r = ranks[name]
        if m.rank != r:
            delta = m.delta()
            dw_rank = choose_rank(torch.linalg.svdvals(delta.double().flatten(1)), None, None)
            if dw_rank > r:
                raise DataError(
                    f"other rank: {m.rank} instead of {r} (module {name}: its dW has rank "
                    f"{dw_rank})"
                )
            m, _ = lowrank(delta, rank=r)
        modules[name] = m
    return weights.replace_modules(modules)


def _load(path: Path, base: dict | None, ranks: dict[str, int]) -> LoRAWeights:
    """A taken LoRA as collected: read, then at the collection's ranks."""
    return at_ranks(read_lora(path, base, check_base=False), ranks, str(path))


def _scan(
    found: list[tuple[str, Path]], base: dict | None, skip_bad: bool
) -> tuple[list[tuple[str, Path, str]], dict[str, Signature], list[tuple[str, str]]]:
    """Read every LoRA once: readable candidates with a signature key, the signatures by key
    (each distinct one stored once), and the LoRAs skipped with their reasons."""
    candidates, signatures, skipped = [], {}, []
    for name, path in found:
        try:
            weights = read_lora(path, base, check_base=False)
            if base is not None:
                weights.check_base(base, str(path))
        except BaseMismatch as err:
            skipped.append((name, f"other base model: {str(err).removeprefix(f'{path}: ')}"))
            continue
        except LoRAError as err:
            if not skip_bad:
                raise
            skipped.append((name, f"unreadable: {err}"))
            continue
        if not weights.resolved:
            skipped.append((name, "kohya names need the base model's modules (--base-modules)"))
        elif not weights.modules:
            skipped.append((name, "no U-Net modules"))
        else:
            sig = signature(weights)
            key = sys.intern(json.dumps(sorted(sig.items())))  # one copy per distinct signature
            signatures.setdefault(key, sig)
            candidates.append((name, path, key))
    return candidates, signatures, skipped


def load_embeddings(path: str | os.PathLike, names: list[str]) -> np.ndarray:
    """[N, E] embeddings in the order of `names` from a safetensors file of name -> vector."""
    try:
        with safe_open(str(path), framework="pt") as f:
            missing = [n for n in names if n not in f.keys()]
            if missing:
                raise DataError(f"embeddings {path}: no embedding for LoRA {missing[0]!r}")
            rows = [f.get_tensor(n) for n in names]
    except (SafetensorError, OSError) as err:
        raise DataError(f"embeddings {path} is not a readable safetensors file ({err})") from None
    dim = tuple(rows[0].shape)
    for name, row in zip(names, rows, strict=True):
        if row.dim() != 1 or tuple(row.shape) != dim:
            like = f" of shape {dim} like {names[0]!r}" if len(dim) == 1 else ""
            raise DataError(
                f"embeddings {path}: {name!r} has shape {tuple(row.shape)}, expected one "
                f"vector{like}"
            )
        if not torch.isfinite(row).all():
            raise DataError(f"embeddings {path}: {name!r} has NaN or inf values")
    return torch.stack(rows).float().numpy()


class RunningStats:
    """Per-coordinate mean and variance over rows seen in chunks (Chan et al.'s merge)."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros(dim)  # sum of squared deviations from the mean

    def update(self, chunk: np.ndarray) -> None:
        """Fold in a [rows, D] chunk; float64, in place: two D-sized temporaries in all."""
        n = chunk.shape[0]
        total = self.count + n
        chunk_mean = chunk.mean(axis=0, dtype=np.float64)
        diff = np.empty_like(self.m2)
        for row in chunk:  # the chunk's own squared deviations add to m2 directly
            np.subtract(row, chunk_mean, out=diff)
            self.m2 += np.square(diff, out=diff)
        # merge: delta = mean_b - mean_a; mean += delta n_b / n; m2 += delta^2 n_a n_b / n
        np.subtract(chunk_mean, self.mean, out=diff)
        self.mean += np.multiply(diff, n / total, out=chunk_mean)
        self.m2 += np.multiply(np.square(diff, out=diff), self.count * n / total, out=diff)
        self.count = total

    def std(self) -> np.ndarray:
        """Population standard deviation."""
        return np.sqrt(self.m2 / max(self.count, 1))


def canonical_vector(
    weights: LoRAWeights, spec: FlatSpec, where: str, reference: LoRAWeights | None = None
) -> Tensor:
    """The LoRA's canonical factors (aligned to `reference` if given) as one float32 vector
    in the spec's layout."""
    canonical, _ = canonicalize(weights)
    if FlatSpec.of(canonical) != spec:
        raise DataError(f"{where} changed while the collection was written")
    if reference is not None:
        canonical = align(canonical, reference)
    return spec.flatten(canonical)


def build_reference(
    taken: list[tuple[str, Path]], spec: FlatSpec, base: dict | None, ranks: dict[str, int]
) -> LoRAWeights:
    """The alignment reference of the taken LoRAs: one streaming pass (`ReferenceBuilder`)."""
    builder = ReferenceBuilder()
    for _, path in taken:
        canonical, _ = canonicalize(_load(path, base, ranks))
        if FlatSpec.of(canonical) != spec:
            raise DataError(f"{path} changed while the collection was written")
        builder.add(canonical)
    return builder.reference()


def _stream_dataset(
    out: Path,
    n: int,
    spec: FlatSpec,
    chunks: Iterable[np.ndarray],
    embeddings: np.ndarray | None,
    metadata: dict,
    reference: LoRAWeights | None = None,
) -> None:
    """Write the vectors chunk by chunk (statistics from the same pass), then mean, std, the
    reference and embeddings; a chunk may be reused by its producer once the next one is
    asked for."""
    dim = spec.size
    layout = [("vectors", (n, dim)), ("mean", (dim,)), ("std", (dim,))]
    if reference is not None:
        layout.append(("reference", (dim,)))
    if embeddings is not None:
        layout.append(("embeddings", embeddings.shape))
    metadata = {**metadata, "alignment": "none" if reference is None else "reference"}
    stats = RunningStats(dim)
    with StreamWriter(out, layout, metadata) as writer:
        for chunk in chunks:
            stats.update(chunk)
            writer.write(chunk)
        writer.write(stats.mean.astype(np.float32))
        writer.write(stats.std().astype(np.float32))
        if reference is not None:
            writer.write(spec.flatten(reference).numpy())
        if embeddings is not None:
            writer.write(embeddings)


def _canonical_chunks(
    taken: list[tuple[str, Path]],
    spec: FlatSpec,
    base: dict | None,
    chunk_bytes: int,
    reference: LoRAWeights | None,
    ranks: dict[str, int],
) -> Iterator[np.ndarray]:
    """The canonical (aligned) vectors of the taken LoRAs, read chunk by chunk into one buffer."""
    n, dim = len(taken), spec.size
    rows = max(1, min(n, chunk_bytes // (4 * dim)))
    buffer = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, n, rows):
        part = taken[start : start + rows]
        for i, (_, path) in enumerate(part):
            weights = _load(path, base, ranks)
            buffer[i] = canonical_vector(weights, spec, str(path), reference).numpy()
        yield buffer[: len(part)]


def write_dataset(
    out: str | os.PathLike,
    names: list[str],
    spec: FlatSpec,
    vectors: Tensor | np.ndarray | Iterable[np.ndarray],
    embeddings: Tensor | np.ndarray | None = None,
) -> Path:
    """A dataset file from vectors already in the spec's layout: an (N, D) array or row chunks.

    For collections made in code (synthetic data, benchmarks, tests); `collect` is the way
    from LoRA files. The vectors are taken as they are (no canonical form is applied).
    """
    out = Path(out)
    if isinstance(vectors, Tensor | np.ndarray):
        vectors = [np.asarray(vectors, dtype=np.float32)]
    emb = None if embeddings is None else np.asarray(embeddings, dtype=np.float32)
    if emb is not None and emb.shape[:1] != (len(names),):
        raise DataError(f"{len(names)} names but embeddings of shape {emb.shape}")
    metadata = {"format": FORMAT, "names": json.dumps(names), "spec": spec.to_json()}
    metadata["skipped"] = "[]"
    counted = _counted(vectors, len(names), spec.size, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _stream_dataset(out, len(names), spec, counted, emb, metadata)
    return out


def _counted(chunks: Iterable[np.ndarray], n: int, dim: int, out: Path) -> Iterator[np.ndarray]:
    """The chunks, checked: D columns each, n rows in all (DataError otherwise)."""
    seen = 0
    for chunk in chunks:
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 2 or chunk.shape[1] != dim:
            raise DataError(f"{out}: a chunk of shape {chunk.shape} does not have {dim} columns")
        seen += len(chunk)
        if seen > n:
            break
        yield chunk
    if seen != n:
        raise DataError(f"{out}: {seen} vectors given for {n} names")


def _refuse_overwriting_other_files(out: Path) -> None:
    """DataError if `out` exists and is not a LoRA dataset (a LoRA of the folder, say)."""
    if not out.exists():
        return
    try:
        metadata, _ = read_header(out)[:2]
    except DataError:
        metadata = {}
    if metadata.get("format") != FORMAT:
        raise DataError(
            f"dataset path {out} exists and is not a LoRA dataset: it would be overwritten; "
            "give a new file name"
        )


def check_dataset_path(out: Path) -> None:
    """DataError unless `out` is a file path a dataset can be written to (a new file, or a
    dataset to replace)."""
    if out.is_dir():
        raise DataError(f"dataset path {out} is a folder; give a file name")
    check_output_file(out, "dataset path")
    _refuse_overwriting_other_files(out)


def collect(
    loras_dir: str | os.PathLike,
    out: str | os.PathLike,
    embeddings: str | os.PathLike | None = None,
    base_modules: dict | Iterable[str] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    skip_bad: bool = False,
    aligned: bool = True,
    align_to: str | os.PathLike | None = None,
) -> CollectReport:
    """Every LoRA of a folder that fits the majority -> one dataset file (see module doc).

    aligned: rotate every LoRA's pairs to the collection's reference (False: the per-LoRA
    sign rule only); align_to: a dataset file whose reference to use instead (e.g. the
    training collection's, for held-out LoRAs); it must have the same layout.
    """
    base, out = as_base_modules(base_modules), Path(out)
    if align_to is not None and not aligned:
        raise DataError("--align-to and --no-align contradict each other: give one of them")
    check_dataset_path(out)  # before the scan: a place that cannot be written
    # the dataset and the embeddings may lie in the LoRA folder (`synth zoo` writes them there)
    not_loras = {Path(f).resolve() for f in (out, embeddings) if f is not None}
    found = [(n, p) for n, p in find_loras(loras_dir) if p.resolve() not in not_loras]
    candidates, signatures, skipped = _scan(found, base, skip_bad)
    if not candidates:
        raise DataError(f"{loras_dir}: no usable LoRA found")
    majority = signatures[Counter(key for _, _, key in candidates).most_common(1)[0][0]]
    ranks = {name: a[0] for name, (a, _) in majority.items()}
    taken, refit = [], []
    for name, path, key in candidates:
        reason = intruder_reason(signatures[key], majority)
        if reason is not None and ranks_only(signatures[key], majority):
            try:  # a LoRA of another rank whose dW fits the collection's rank
                _load(path, base, ranks)
                reason, refit = None, [*refit, name]
            except DataError as err:
                reason = str(err)
        if reason is None:
            taken.append((name, path))
        else:
            skipped.append((name, reason))
    names = [name for name, _ in taken]
    emb = load_embeddings(embeddings, names) if embeddings is not None else None
    spec = FlatSpec.of(_load(taken[0][1], base, ranks))
    reference = None
    if align_to is not None:
        reference = reference_of(align_to, spec)
    elif aligned:
        reference = build_reference(taken, spec, base, ranks)
    metadata = {
        "format": FORMAT,
        "names": json.dumps(names),
        "spec": spec.to_json(),
        "skipped": json.dumps(skipped),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    chunks = _canonical_chunks(taken, spec, base, chunk_bytes, reference, ranks)
    _stream_dataset(out, len(taken), spec, chunks, emb, metadata, reference)
    return CollectReport(out, names, skipped, spec.size, refit)


def reference_of(path: str | os.PathLike, spec: FlatSpec) -> LoRAWeights:
    """The alignment reference of a dataset file, which must have the layout `spec`."""
    dataset = LoRADataset(path)
    if dataset.reference is None:
        raise DataError(f"{path} has no alignment reference (collected without alignment)")
    if dataset.spec != spec:
        raise DataError(f"{path} has another layout than these LoRAs (other modules or ranks)")
    return dataset.spec.unflatten(dataset.reference)


class LoRADataset:
    """A dataset file opened memory-mapped: rows by index, names, spec, statistics."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        metadata, header, self._start = read_header(self.path)
        if metadata.get("format") != FORMAT:
            raise DataError(f"{self.path} is not a condlora LoRA dataset")
        try:
            self.names: list[str] = json.loads(metadata["names"])
            self.skipped = [(str(n), str(r)) for n, r in json.loads(metadata["skipped"])]
            self.spec = FlatSpec.from_json(metadata["spec"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{self.path}: malformed dataset metadata ({err})") from None
        self._index = {name: i for i, name in enumerate(self.names)}
        self.vectors = self._map(header, "vectors")
        if self.vectors.shape != (len(self.names), self.spec.size):
            raise DataError(f"{self.path}: vectors {self.vectors.shape} do not fit names and spec")
        self.mean = torch.from_numpy(np.array(self._map(header, "mean")))
        self.std = torch.from_numpy(np.array(self._map(header, "std")))
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.std).all()):
            raise DataError(f"{self.path} holds NaN or inf values (its mean or std is not finite)")
        self.embeddings = self._map(header, "embeddings") if "embeddings" in header else None
        self.alignment = metadata.get("alignment", "none")
        self.reference = None  # (D,) the alignment reference (alignment "reference")
        if self.alignment == "reference":
            self.reference = torch.from_numpy(np.array(self._map(header, "reference")))

    def _map(self, header: dict, name: str) -> np.memmap:
        """A read-only memory map of one tensor."""
        shape, offset = tensor_info(header, name, self.path)
        return np.memmap(self.path, np.float32, "r", offset=self._start + offset, shape=shape)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        """Length D of each vector."""
        return self.spec.size

    def index(self, name: str) -> int:
        """Row of a LoRA by name."""
        if name not in self._index:
            raise DataError(f"{self.path} holds no LoRA named {name!r}")
        return self._index[name]

    def row(self, i: int) -> Tensor:
        """Vector i (a copy, float32)."""
        return torch.from_numpy(np.array(self.vectors[i]))

    def embedding(self, i: int) -> Tensor:
        """Embedding of row i; DataError if the dataset has none."""
        if self.embeddings is None:
            raise DataError(f"{self.path} holds no embeddings")
        return torch.from_numpy(np.array(self.embeddings[i]))

    def chunks(self, rows: int = 256) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, [rows, D] array) over the whole matrix, read with plain file reads so
        that resident memory stays at one chunk."""
        nbytes = self.dim * 4
        with open(self.path, "rb") as f:
            f.seek(self.vectors.offset)
            for first in range(0, len(self), rows):
                count = min(rows, len(self) - first)
                data = np.frombuffer(f.read(count * nbytes), dtype=np.float32)
                yield first, data.reshape(count, self.dim)

    def lora(self, i: int) -> LoRAWeights:
        """Row i as a LoRA (canonical factors, scale 1)."""
        return self.spec.unflatten(self.row(i))
