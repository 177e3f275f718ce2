"""The one in-memory form of a LoRA file: per module `(A, B, scale)`, dW = scale * B A.

Shapes (as peft and kohya store them):
    linear: A [r, in],       B [out, r]          dW [out, in]
    conv:   A [r, in, k, k], B [out, r, 1, 1]    dW [out, in, k, k]  (= B A on flattened kernels)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from condlora.core.errors import LoRAError
from condlora.lora.formats.keys import is_text_module, unmapped_reason
from condlora.lora.formats.kinds import ModuleDelta

# A base model's modules: dotted name -> weight shape (None when only the name is known).
BaseModules = Mapping[str, "tuple[int, ...] | None"]


class BaseMismatch(LoRAError):
    """A LoRA made for another base model: a module it lacks or a weight of another shape."""


@dataclass(frozen=True)
class ModuleLoRA:
    """One module's low-rank update: dW = scale * B @ A (conv kernels flattened)."""

    A: Tensor
    B: Tensor
    scale: float

    @property
    def rank(self) -> int:
        """The inner dimension r."""
        return self.A.shape[0]

    @property
    def is_conv(self) -> bool:
        """True for a conv LoRA (4-d factors)."""
        return self.A.dim() == 4

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of dW: the base weight's shape, [out, in] or [out, in, k, k]."""
        return (self.B.shape[0], *self.A.shape[1:])

    def matrices(self) -> tuple[Tensor, Tensor]:
        """(A [r, in*k*k], B [out, r]): the factors as matrices."""
        return self.A.reshape(self.rank, -1), self.B.reshape(self.B.shape[0], self.rank)

    def delta(self) -> Tensor:
        """dW = scale * B A, in the base weight's shape."""
        a, b = self.matrices()
        return (self.scale * (b @ a)).reshape(self.delta_shape)

    def delta_norm(self) -> float:
        """||dW||_F without forming dW: |s| sqrt(sum((B^T B) * (A A^T)))."""
        a, b = (t.double() for t in self.matrices())
        return abs(self.scale) * float(((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt())

    def folded(self) -> ModuleLoRA:
        """The same dW with the scale carried by B (scale 1)."""
        return ModuleLoRA(self.A, self.B * self.scale, 1.0)


def make_module(name: str, A: Tensor, B: Tensor, scale: float, where: str) -> ModuleLoRA:
    """A ModuleLoRA after checking the factors' shapes against each other; LoRAError if not."""
    prefix = f"{where}: module {name}"
    if A.dim() not in (2, 4) or B.dim() != A.dim():
        raise LoRAError(
            f"{prefix}: A {tuple(A.shape)} and B {tuple(B.shape)} are neither linear "
            "(2-d) nor conv (4-d) LoRA factors"
        )
    if A.shape[0] != B.shape[1]:
        raise LoRAError(
            f"{prefix}: A has rank {A.shape[0]} but B has rank {B.shape[1]} "
            f"(A {tuple(A.shape)}, B {tuple(B.shape)})"
        )
    if B.dim() == 4 and tuple(B.shape[2:]) != (1, 1):
        raise LoRAError(f"{prefix}: conv B must be [out, r, 1, 1], got {tuple(B.shape)}")
    if not math.isfinite(scale):
        raise LoRAError(f"{prefix}: scale {scale} is not finite")
    return ModuleLoRA(A, B, float(scale))


@dataclass
class LoRAWeights:
    """A whole LoRA: dotted module paths of the base model -> (A, B, scale).

    `text_encoder` holds the text encoders' modules, named `text_encoder.<path>` or
    `text_encoder_2.<path>` (paths in the CLIP text model). `resolved` is False when U-Net
    names could not be mapped to dotted paths (a kohya file read without the base model's
    module list): they are then kohya's underscore names. `unmapped` lists every key of the
    file that is not read, with the reason. `others` holds the modules (U-Net or text encoder)
    whose update is not one low-rank pair: LoHa, LoKr, full diffs, Tucker, DoRA (kinds.py).
    """

    modules: dict[str, ModuleLoRA]
    layout: str = ""
    text_encoder: dict[str, ModuleLoRA] = field(default_factory=dict)
    resolved: bool = True
    hints: dict[str, str] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)
    others: dict[str, ModuleDelta] = field(default_factory=dict)

    def replace_modules(self, modules: dict[str, ModuleLoRA]) -> LoRAWeights:
        """The same LoRA (text encoders, names, hints, unmapped keys, other kinds) with other
        U-Net modules."""
        return LoRAWeights(
            modules,
            self.layout,
            self.text_encoder,
            self.resolved,
            self.hints,
            self.unmapped,
            self.others,
        )

    def fold_scale(self) -> LoRAWeights:
        """The same LoRA with every scale folded into its B factor (all scales 1)."""
        return self.replace_modules({name: m.folded() for name, m in self.modules.items()})

    def deltas(self) -> dict[str, Tensor]:
        """dW of every module."""
        return {name: m.delta() for name, m in self.modules.items()}

    def ranks(self) -> dict[str, int]:
        """Rank of every module."""
        return {name: m.rank for name, m in self.modules.items()}

    def num_parameters(self) -> int:
        """Numbers in all A and B factors, and in the parts of other kinds (alphas aside)."""
        pairs = {**self.modules, **self.text_encoder}.values()
        others = (t for m in self.others.values() for r, t in m.parts.items() if r != "alpha")
        return sum(m.A.numel() + m.B.numel() for m in pairs) + sum(t.numel() for t in others)

    def check_mapped(self, where: str) -> None:
        """LoRAError naming the first key that maps to no module (and how many more)."""
        if self.unmapped:
            key, reason = next(iter(self.unmapped.items()))
            more = f" (and {len(self.unmapped) - 1} more)" if len(self.unmapped) > 1 else ""
            raise LoRAError(f"{where}key {key!r} maps to no module: {reason}{more}")

    def check_finite(self, where: str) -> None:
        """LoRAError naming the first module with an integer factor or a NaN or inf value."""
        for name, m in {**self.modules, **self.text_encoder}.items():
            for label, t in (("A", m.A), ("B", m.B)):
                if not t.is_floating_point():
                    raise LoRAError(f"{where}: module {name} has {t.dtype} values in {label}")
                if not torch.isfinite(t).all():
                    raise LoRAError(f"{where}: module {name} has NaN or inf values in {label}")

    def check_base(self, base: BaseModules, where: str) -> None:
        """LoRAError if a module is not in the base model or its dW does not fit its weight."""
        for name in self.others:
            if not is_text_module(name) and name not in base:
                raise BaseMismatch(f"{where}: module {name} is not in the base model")
        for name, m in self.modules.items():
            if name not in base:
                raise BaseMismatch(f"{where}: module {name} is not in the base model")
            shape = base[name]
            if shape is not None and not _fits(m.delta_shape, tuple(shape)):
                raise BaseMismatch(
                    f"{where}: module {name}: dW {m.delta_shape} does not fit the base "
                    f"weight {tuple(shape)} (another base model?)"
                )


def _fits(delta: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    """dW fits the weight: equal shapes, or equal up to trailing 1x1 kernel dimensions."""
    trim = lambda s: s[:2] if s[2:] == (1,) * len(s[2:]) else s  # noqa: E731
    return delta == weight or trim(delta) == trim(weight)


def group_by_module(
    tensors: Mapping[str, Tensor],
    prefix: str,
    suffixes: Mapping[str, str],
    where: str,
    unmapped: dict[str, str],
) -> dict[str, dict[str, Tensor]]:
    """Split `prefix<module><suffix>` keys by module: {module: {role: tensor}}.

    `suffixes` is the layout's key table (suffix -> role); a key with another prefix or
    suffix (DoRA, LoCon, bias ...) goes into `unmapped` with the reason.
    """
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        body = key[len(prefix) :]
        match = next((s for s in suffixes if body.endswith(s)), None)
        if not key.startswith(prefix) or match is None:
            unmapped[key] = unmapped_reason(key)
            continue
        groups.setdefault(body[: -len(match)], {})[suffixes[match]] = value
    for module, parts in groups.items():
        for role in ("A", "B"):
            if role not in parts:
                raise LoRAError(f"{where}: module {module} has no {role} factor")
    return groups


def factor_ranks(groups: Mapping[str, Mapping[str, Tensor]], where: str) -> dict[str, int]:
    """Each module's rank r from its factors, after checking that they are LoRA factors
    (2-d or 4-d, the same for A and B) of rank >= 1; LoRAError naming the module if not."""
    ranks = {}
    for module, parts in groups.items():
        a, b = parts["A"], parts["B"]
        if a.dim() not in (2, 4) or b.dim() != a.dim():
            raise LoRAError(
                f"{where}: module {module}: A {tuple(a.shape)} and B {tuple(b.shape)} are "
                "neither linear (2-d) nor conv (4-d) LoRA factors"
            )
        if a.shape[0] == 0:
            raise LoRAError(f"{where}: module {module} has rank 0 (empty factors)")
        ranks[module] = a.shape[0]
    return ranks


def alpha_value(alpha: Tensor, module: str, where: str) -> float:
    """A stored `.alpha`: one finite number (a scalar or a one-element tensor)."""
    if alpha.numel() != 1 or alpha.dtype == torch.bool:
        raise LoRAError(
            f"{where}: module {module}: alpha must be one number, got a {alpha.dtype} tensor "
            f"of shape {tuple(alpha.shape)}"
        )
    value = float(alpha.double().reshape(()))
    if not math.isfinite(value):
        raise LoRAError(f"{where}: module {module}: alpha {value} is not finite")
    return value


def config_number(value: object, key: str, where: str, positive_int: bool = False) -> float:
    """A number from an adapter config (r, lora_alpha, a pattern's value); LoRAError if it is
    text, a list, a bool, not finite, or (for a rank) not an integer >= 1."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and positive_int:
        ok = float(value).is_integer() and value >= 1
    if not ok or not math.isfinite(float(value)):
        kind = "an integer >= 1" if positive_int else "a finite number"
        raise LoRAError(f"{where}: config {key} must be {kind}, got {value!r}")
    return value


def clean_number(x: float) -> float | int:
    """x rounded to 12 significant digits, an int when whole (27.000000000000004 -> 27)."""
    y = float(f"{x:.12g}")
    return int(y) if y.is_integer() else y
