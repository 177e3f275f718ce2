"""Module updates that are not one low-rank pair: LyCORIS LoHa / LoKr, full diffs, conv LoRA
with a middle (Tucker) factor, DoRA. Each keeps the file's own tensors (to write them back)
and gives its exact dW where one exists without the base weight (conventions of LyCORIS):

    loha    dW = s (W1a W1b) ⊙ (W2a W2b),  s = alpha / r, r = W1b rows
            Tucker form: W1 = t1 x_1 W1a^T x_2 W1b^T (einsum "i j ..., j r, i p -> p r ...")
    lokr    dW = s kron(W1, W2), W1 = lokr_w1 or w1_a w1_b, W2 likewise (or Tucker with t2);
            s = alpha / r with r the rows of a factored half's b, and s = 1 if neither is
    full    dW = diff (diff_b: the bias' update, kept beside it)
    tucker  dW[o, i, k, l] = s sum_ab up[o, a] mid[a, b, k, l] down[b, i],  s = alpha / r
    dora    W' = m (W + s B A) / ||W + s B A|| (column norms): dW needs the base weight W;
            LyCORIS kinds may carry the same magnitude (dora_scale): then so do they
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from condlora.core.errors import LoRAError

# kind -> (roles it may hold, roles it must hold), in the order kind_of tries them;
# A / B / alpha are the low-rank pair's
KINDS = {
    "loha": (
        {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"}
        | {"dora_scale"},
        {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    ),
    "lokr": (
        {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
        | {"alpha", "dora_scale"},
        set(),
    ),
    "full": ({"diff", "diff_b"}, {"diff"}),
    "dora": ({"A", "B", "magnitude", "alpha"}, {"A", "B", "magnitude"}),  # peft's vector
    "kohya_dora": ({"A", "B", "dora_scale", "alpha"}, {"A", "B", "dora_scale"}),
    "tucker": ({"A", "B", "mid", "alpha", "dora_scale"}, {"A", "B", "mid"}),
}
DESCRIPTIONS = {
    "loha": "LyCORIS LoHa (Hadamard product of two low-rank pairs)",
    "lokr": "LyCORIS LoKr (Kronecker product)",
    "full": "full weight difference",
    "tucker": "conv LoRA with a middle (Tucker) factor",
    "dora": "DoRA (a magnitude vector on top of the low-rank pair)",
    "kohya_dora": "DoRA (kohya / LyCORIS dora_scale on top of the low-rank pair)",
}


def kind_of(roles: set[str]) -> str:
    """The kind of module that a set of roles makes: lora, a key of KINDS, or mixed."""
    if roles <= {"A", "B", "alpha"}:
        return "lora"
    return next((kind for kind, (allowed, _) in KINDS.items() if roles <= allowed), "mixed")


@dataclass(frozen=True)
class ModuleDelta:
    """One module's update of a kind other than a plain LoRA; `parts` are the file's tensors
    by role, `shape` the base weight's shape when known (conv LoHa / LoKr need it)."""

    kind: str
    parts: dict[str, Tensor]
    shape: tuple[int, ...] | None = None

    @property
    def rank(self) -> int | None:
        """The r that alpha is divided by, or None (full diffs; LoKr without a factored half)."""
        p = self.parts
        if self.kind == "loha":
            return p["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            half = p.get("lokr_w1_b", p.get("lokr_w2_b"))
            return None if half is None else half.shape[0]
        if self.kind in ("tucker", "dora", "kohya_dora"):
            return p["A"].shape[0]
        return None

    @property
    def scale(self) -> float:
        """alpha / r (alpha = r when the file has none), 1 when there is no r."""
        r = self.rank
        if r is None:
            return 1.0
        alpha = self.parts.get("alpha")
        return (float(alpha.double().reshape(())) if alpha is not None else r) / r

    @property
    def exact(self) -> bool:
        """False with a DoRA magnitude (any kind): dW then depends on the base weight."""
        return not {"magnitude", "dora_scale"} & set(self.parts)

    @property
    def ambiguous_shape(self) -> bool:
        """True when dW's shape is unknown: LoHa / LoKr store conv kernels flattened, so a 2-d
        dW may be a linear weight or a conv kernel until the base weight's shape is given."""
        if self.shape is not None or self.kind not in ("loha", "lokr") or not self.exact:
            return False
        return self.delta().dim() == 2

    def describe(self) -> str:
        """What the module is, in words."""
        dora = " with a DoRA magnitude" if "dora" not in self.kind and not self.exact else ""
        return DESCRIPTIONS[self.kind] + dora

    def delta(self) -> Tensor:
        """The exact dW, in the base weight's shape when known."""
        if not self.exact:
            raise LoRAError(f"{self.describe()}: dW depends on the base weight")
        delta = _DELTAS[self.kind](self.parts) * self.scale
        if self.shape is not None and delta.numel() == math.prod(self.shape):
            delta = delta.reshape(self.shape)
        return delta

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of dW."""
        if self.shape is not None:
            return tuple(self.shape)
        if "dora" in self.kind:
            a, b = self.parts["A"], self.parts["B"]
            return (b.shape[0], *a.shape[1:])
        bare = {k: v for k, v in self.parts.items() if k != "dora_scale"}
        return tuple(ModuleDelta(self.kind, bare).delta().shape)

    def delta_norm(self) -> float | None:
        """||dW||_F, or None for DoRA."""
        return float(self.delta().double().norm()) if self.exact else None


def _loha(p: dict[str, Tensor]) -> Tensor:
    """(W1a W1b) ⊙ (W2a W2b), each half Tucker-chained when t1 / t2 are given."""
    if "hada_t1" in p:
        half = lambda t, b, a: torch.einsum("i j ..., j r, i p -> p r ...", t, b, a)  # noqa: E731
        return half(p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"]) * half(
            p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"]
        )
    w1 = p["hada_w1_a"].flatten(1) @ p["hada_w1_b"].flatten(1)
    return w1 * (p["hada_w2_a"].flatten(1) @ p["hada_w2_b"].flatten(1))


def _lokr(p: dict[str, Tensor]) -> Tensor:
    """kron(W1, W2), each half rebuilt from its factors when not stored whole; a conv W2
    keeps its kernel axes (w2_b [r, in, k, k]), and W1 gets trailing 1s to match them."""
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2 = torch.einsum(
            "i j ..., j r, i p -> p r ...", p["lokr_t2"], p["lokr_w2_b"], p["lokr_w2_a"]
        )
    else:
        b = p["lokr_w2_b"]
        w2 = (p["lokr_w2_a"] @ b.reshape(b.shape[0], -1)).reshape(-1, *b.shape[1:])
    w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))
    return torch.kron(w1.contiguous(), w2.contiguous())


def _tucker(p: dict[str, Tensor]) -> Tensor:
    """sum_ab up[o, a] mid[a, b, k, l] down[b, i]."""
    return torch.einsum("oa,abkl,bi->oikl", p["B"].flatten(1), p["mid"], p["A"].flatten(1))


_DELTAS = {"loha": _loha, "lokr": _lokr, "full": lambda p: p["diff"], "tucker": _tucker}


def check_parts(kind: str, parts: dict[str, Tensor], module: str, where: str) -> None:
    """LoRAError if a module lacks a part its kind needs, or its dW cannot be formed."""
    missing = KINDS[kind][1] - set(parts)
    if kind == "lokr":
        for half in ("1", "2"):
            if f"lokr_w{half}" not in parts and not {f"lokr_w{half}_a", f"lokr_w{half}_b"} <= set(
                parts
            ):
                missing.add(f"lokr_w{half}")
    if missing:
        first = sorted(missing)[0]
        raise LoRAError(f"{where}: {DESCRIPTIONS[kind]} module {module} has no {first}")
    for role, t in parts.items():
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise LoRAError(f"{where}: module {module}: {role} is not finite floating point")
        if (t.numel() != 1) if role == "alpha" else (t.dim() == 0 or t.numel() == 0):
            raise LoRAError(f"{where}: module {module}: {role} has shape {tuple(t.shape)}")
    if {"magnitude", "dora_scale"} & set(parts):
        return
    try:
        delta = ModuleDelta(kind, parts).delta()
    except (RuntimeError, IndexError, ValueError) as err:
        first = str(err).splitlines()[0]
        why = f"its {kind} parts do not fit ({first})"
        raise LoRAError(f"{where}: module {module}: {why}") from None
    if not torch.isfinite(delta).all():
        raise LoRAError(f"{where}: module {module}: its dW overflows (values beyond float)")
