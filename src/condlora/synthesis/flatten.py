"""One vector per LoRA: all factors laid end to end, with a spec that maps it back exactly.

The spec lists (module, factor, shape, offset) for every factor, modules in sorted order,
A before B; it is stored as JSON with every dataset and every generated vector. Before
flattening, `align` puts each LoRA's factors in the gauge of a reference (the factors of a
LoRA are unique only up to an invertible r x r matrix; see the functions below).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from condlora.core.errors import DataError
from condlora.lora.canonical import align_factors, closest_rotation, pair_matrix
from condlora.lora.formats import LoRAWeights, ModuleLoRA

SPEC_VERSION = 1


@dataclass(frozen=True)
class SpecEntry:
    """Where one factor of one module lives in the flat vector."""

    module: str  # dotted module path in the base model
    factor: str  # "A" or "B"
    shape: tuple[int, ...]  # the factor's shape (conv factors keep 4 dims)
    offset: int  # first index in the vector

    @property
    def size(self) -> int:
        """Number of entries."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class FlatSpec:
    """The layout of a flat LoRA vector."""

    entries: tuple[SpecEntry, ...]

    @property
    def size(self) -> int:
        """Length D of the vector."""
        return self.entries[-1].offset + self.entries[-1].size if self.entries else 0

    @property
    def modules(self) -> list[str]:
        """Module paths in vector order."""
        return [e.module for e in self.entries if e.factor == "A"]

    @classmethod
    def of(cls, weights: LoRAWeights) -> FlatSpec:
        """The spec of a LoRA's factors: modules sorted by name, A then B."""
        entries, offset = [], 0
        for name in sorted(weights.modules):
            module = weights.modules[name]
            for factor, tensor in (("A", module.A), ("B", module.B)):
                entries.append(SpecEntry(name, factor, tuple(tensor.shape), offset))
                offset += tensor.numel()
        return cls(tuple(entries))

    def flatten(self, weights: LoRAWeights, dtype: torch.dtype = torch.float32) -> Tensor:
        """The LoRA as one vector (its scales folded into B); DataError if it does not fit."""
        if self != FlatSpec.of(weights):
            raise DataError("LoRA does not fit the layout spec (other modules, ranks or shapes)")
        folded = weights.fold_scale()
        parts = [getattr(folded.modules[e.module], e.factor).reshape(-1) for e in self.entries]
        return torch.cat([p.to(dtype) for p in parts]) if parts else torch.zeros(0, dtype=dtype)

    def unflatten(self, vector: Tensor) -> LoRAWeights:
        """The LoRA (scale 1) that a vector holds; exact inverse of `flatten`."""
        if vector.shape != (self.size,):
            shape = tuple(vector.shape)
            raise DataError(f"vector of shape {shape} does not fit the spec's ({self.size},)")
        factors: dict[str, dict[str, Tensor]] = {}
        for e in self.entries:
            part = vector[e.offset : e.offset + e.size].reshape(e.shape)
            factors.setdefault(e.module, {})[e.factor] = part
        modules = {name: ModuleLoRA(f["A"], f["B"], 1.0) for name, f in factors.items()}
        return LoRAWeights(modules)

    def to_json(self) -> str:
        """The spec as a JSON string."""
        rows = [[e.module, e.factor, list(e.shape), e.offset] for e in self.entries]
        return json.dumps({"version": SPEC_VERSION, "entries": rows})

    @classmethod
    def from_json(cls, text: str) -> FlatSpec:
        """A spec from `to_json`'s string; DataError if it is malformed."""
        try:
            data = json.loads(text)
            entries = tuple(SpecEntry(m, f, tuple(s), int(o)) for m, f, s, o in data["entries"])
        except (TypeError, ValueError, KeyError) as err:
            raise DataError(f"malformed layout spec ({err})") from None
        if data.get("version") != SPEC_VERSION:
            raise DataError(f"layout spec version {data.get('version')} is not {SPEC_VERSION}")
        spec, offset = cls(entries), 0
        for e in entries:
            if e.offset != offset or e.factor not in ("A", "B"):
                raise DataError(f"malformed layout spec at module {e.module} ({e.factor})")
            offset += e.size
        return spec


class ReferenceBuilder:
    """The reference factors of a collection, from its canonical LoRAs seen one at a time.

    Memory: one float64 pair matrix per module (the size of one LoRA).
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}  # module -> sum of the aligned pair matrices
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.count = 0

    def add(self, canonical: LoRAWeights) -> None:
        """Fold in one LoRA in canonical form (scale 1), aligned to the running sum."""
        for name, module in canonical.modules.items():
            p = pair_matrix(module)
            if name not in self.sums:
                self.sums[name] = p.clone()
                self.shapes[name] = (tuple(module.A.shape), tuple(module.B.shape))
            else:
                self.sums[name] += p @ closest_rotation(p.T @ self.sums[name])
        self.count += 1

    def reference(self) -> LoRAWeights:
        """The mean aligned factors as a LoRA (scale 1, the collection's module shapes)."""
        if not self.count:
            raise DataError("a reference needs at least one LoRA")
        modules = {}
        for name, total in self.sums.items():
            mean = total / self.count
            a_shape, b_shape = self.shapes[name]
            out = b_shape[0]
            b, a = mean[:out], mean[out:].T
            modules[name] = ModuleLoRA(a.reshape(a_shape).float(), b.reshape(b_shape).float(), 1.0)
        return LoRAWeights(modules)


def align(canonical: LoRAWeights, reference: LoRAWeights) -> LoRAWeights:
    """Every module's canonical factors rotated to the reference's (the same dW)."""
    if set(canonical.modules) != set(reference.modules):
        raise DataError("the LoRA's modules differ from the reference's")
    modules = {
        name: align_factors(module, pair_matrix(reference.modules[name]))
        for name, module in canonical.modules.items()
    }
    return LoRAWeights(
        modules, canonical.layout, canonical.text_encoder, canonical.resolved, canonical.hints
    )
