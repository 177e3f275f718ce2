"""CondLoRALayer: one wrapper for nn.Linear and 1x1 nn.Conv1d / nn.Conv2d.

    y = W x + b + s * ( B ((w(c) ⊗ 1_r) ⊙ (A x)) + w(c) E )

A: (m*r, d_in), B: (d_out, m*r), E: (m, d_out). Rows i*r:(i+1)*r of A (and the same
columns of B) are basis i, so all m bases are one rank m*r update: one A and one B matmul.
Linear and 1x1 convs differ only in the axis that holds channels (last vs 1).

With `bias_per_rank` E has m*r rows and the bias term is (w ⊗ 1_r) E, as the paper's code
parametrises it: the same functions (basis i's bias is the sum of its r rows), with r
times the parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condlora.core.errors import LoRAError
from condlora.lora.state import ConditionState


def check_target(name: str, module: nn.Module) -> None:
    """Raise LoRAError unless `module` is a Linear or a plain 1x1 Conv1d/Conv2d."""
    if isinstance(module, nn.Linear):
        return
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        pointwise = all(k == 1 for k in module.kernel_size) and all(s == 1 for s in module.stride)
        no_pad = module.padding in ("valid", "same") or all(p == 0 for p in module.padding)
        if pointwise and no_pad and module.groups == 1:
            return
        raise LoRAError(
            f"target {name!r} is {module}: only 1x1 convs with stride 1, no padding and "
            "groups=1 can take a LoRA (they act as per-position Linear layers)"
        )
    raise LoRAError(
        f"target {name!r} is a {type(module).__name__}; only nn.Linear and 1x1 nn.Conv1d / "
        "nn.Conv2d can be wrapped (narrow the target pattern)"
    )


class CondLoRALayer(nn.Module):
    """Base layer plus a conditional LoRA whose m bases are mixed by a composer."""

    def __init__(
        self,
        base_layer: nn.Module,  # nn.Linear or 1x1 nn.Conv1d / nn.Conv2d, kept as is
        rank: int,  # r, rank of each basis
        composer: nn.Module,  # condition -> w(c) of shape (batch, m)
        state: ConditionState,  # where the current condition is read from
        scale: float = 1.0,  # s
        bias: bool = False,  # learn a per-basis bias E
        bias_per_rank: bool = False,  # E of shape (m*r, d_out) instead of (m, d_out)
    ) -> None:
        super().__init__()
        check_target(type(base_layer).__name__, base_layer)
        self.base_layer = base_layer
        self.is_conv = not isinstance(base_layer, nn.Linear)
        weight = base_layer.weight
        d_out, d_in = weight.shape[:2]
        m = composer.num_weights
        self.rank, self.num_bases, self.scale = rank, m, scale
        self.composer = composer.to(device=weight.device, dtype=weight.dtype)
        self.state = state
        kw = {"device": weight.device, "dtype": weight.dtype}
        # A ~ N(0, (1/r)^2), B = 0, E = 0: a fresh wrapper computes exactly the base layer
        self.lora_A = nn.Parameter(torch.randn(m * rank, d_in, **kw) / rank)
        self.lora_B = nn.Parameter(torch.zeros(d_out, m * rank, **kw))
        e_rows = m * rank if bias_per_rank else m
        self.lora_E = nn.Parameter(torch.zeros(e_rows, d_out, **kw)) if bias else None
        self.merged = False
        # while merged: copies of the base weight and bias to restore (exact, no rounding
        # drift) and whether merge created the bias
        self._merged: tuple[Tensor, Tensor | None, bool] | None = None

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (host code such as diffusers reads `.weight.dtype`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

    def forward(self, x: Tensor) -> Tensor:
        """Base output plus the LoRA update at the current condition (skipped while merged)."""
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.lora_update(x, self.composer(**self.state.inputs()))

    def lora_update(self, x: Tensor, w: Tensor) -> Tensor:
        """s * (B ((w ⊗ 1_r) ⊙ A x) + w E) for input x and basis weights w (batch or 1, m)."""
        if w.dim() != 2 or w.shape[1] != self.num_bases:
            raise LoRAError(
                f"basis weights must be (batch, {self.num_bases}), got {tuple(w.shape)}"
            )
        needed = self.base_layer.weight.dim() if self.is_conv else 2  # (B, C, *spatial)
        if x.dim() < needed or (self.is_conv and x.dim() != needed):
            raise LoRAError(f"{self._kind()} LoRA needs batched input, got shape {tuple(x.shape)}")
        if w.shape[0] not in (1, x.shape[0]):
            raise LoRAError(f"condition batch {w.shape[0]} does not match input batch {x.shape[0]}")
        xc = x.movedim(1, -1) if self.is_conv else x  # channels last
        h = F.linear(xc, self.lora_A)  # (batch, ..., m*r)
        w = w.to(device=h.device, dtype=h.dtype)
        shape = (w.shape[0],) + (1,) * (h.dim() - 2) + (-1,)  # broadcast over positions
        h = h * w.repeat_interleave(self.rank, dim=1).view(shape)  # (w ⊗ 1_r) ⊙ A x
        delta = F.linear(h, self.lora_B)
        if self.lora_E is not None:
            delta = delta + (self._bias_weights(w) @ self.lora_E).view(shape)
        delta = self.scale * delta
        return delta.movedim(-1, 1) if self.is_conv else delta

    def _single(self, w: Tensor) -> Tensor:
        """Basis weights (m,) of a single condition: w of shape (m,), (1, m) or equal rows."""
        w = w.reshape(1, -1) if w.dim() == 1 else w
        if w.dim() != 2 or w.shape[1] != self.num_bases:
            raise LoRAError(
                f"basis weights must be (batch, {self.num_bases}), got {tuple(w.shape)}"
            )
        if not torch.allclose(w, w[:1].expand_as(w), rtol=1e-5, atol=1e-6):
            raise LoRAError("merge needs one condition for the whole batch; rows of w differ")
        return w[0]

    def get_delta_weight(self, w: Tensor) -> Tensor:
        """dW = s * B diag(w ⊗ 1_r) A at one condition, shaped like the base weight."""
        w = self._single(w).to(self.lora_B)
        delta = self.scale * (self.lora_B * w.repeat_interleave(self.rank)) @ self.lora_A
        return delta.reshape(self.base_layer.weight.shape)

    def get_delta_bias(self, w: Tensor) -> Tensor | None:
        """db = s * w E at one condition (None without per-basis bias)."""
        if self.lora_E is None:
            return None
        return self.scale * (self._bias_weights(self._single(w).to(self.lora_E)) @ self.lora_E)

    def _bias_weights(self, w: Tensor) -> Tensor:
        """w, or w ⊗ 1_r when E has one row per rank-1 component."""
        if self.lora_E.shape[0] == self.num_bases:
            return w
        return w.repeat_interleave(self.rank, dim=-1)

    @torch.no_grad()
    def merge(self, w: Tensor) -> None:
        """Fold the update at one condition into the base weight and bias."""
        if self.merged:
            raise LoRAError("LoRA is already merged; call unmerge first")
        dw, db = self.get_delta_weight(w), self.get_delta_bias(w)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        created = db is not None and bias is None
        self._merged = (
            weight.detach().clone(),
            None if bias is None else bias.detach().clone(),
            created,
        )
        weight.add_(dw)
        if created:
            self.base_layer.bias = nn.Parameter(db.clone(), requires_grad=False)
        elif db is not None:
            bias.add_(db)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` exactly: restore the saved weight and bias, drop a bias merge created."""
        if not self.merged:
            raise LoRAError("LoRA is not merged; nothing to unmerge")
        weight, bias, created = self._merged
        self.base_layer.weight.copy_(weight)
        if created:
            self.base_layer.bias = None
        elif bias is not None:
            self.base_layer.bias.copy_(bias)
        self._merged = None
        self.merged = False

    def _kind(self) -> str:
        return type(self.base_layer).__name__

    def extra_repr(self) -> str:
        """Rank, number of bases, scale and bias flag."""
        return (
            f"rank={self.rank}, num_bases={self.num_bases}, scale={self.scale}, "
            f"bias={self.lora_E is not None}, merged={self.merged}"
        )
