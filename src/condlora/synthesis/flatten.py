"""One vector per LoRA: all factors laid end to end, with a spec that maps it back exactly.

The spec lists (module, factor, shape, offset) for every factor, modules in sorted order,
A before B; it is stored as JSON with every dataset and every generated vector.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from condlora.core.errors import DataError
from condlora.lora.formats.weights import LoRAWeights, ModuleLoRA

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
