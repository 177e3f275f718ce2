"""CondLoRALayer: one wrapper for nn.Linear and 1x1 nn.Conv1d / nn.Conv2d.

    y = W x + b + s * ( B ((w(c) ⊗ 1_r) ⊙ (A x)) + w(c) E )

A: (m*r, d_in), B: (d_out, m*r), E: (m, d_out). Rows i*r:(i+1)*r of A (and the same
columns of B) are basis i, so all m bases are one rank m*r update: one A and one B matmul.
Linear and 1x1 convs differ only in the axis that holds channels (last vs 1).

Two paths compute the same function:
- low-rank (training, or rows of w(c) that differ): W x and A x, then the B product added
  in place, then b + s w E; every basis and sample in the same ops.
- merged (no gradients, every row of w(c) equal, e.g. a sampling batch that shares its
  noise level and class): W + s B diag(w ⊗ 1_r) A is formed once per call and applied as
  the base layer's weight, so the LoRA costs one small matmul per call, not per position.
  In a forward pass of the injected model the wrappers of one shape form theirs together
  (`CondLoRALayer.merged_group`, a few batched ops for the group, none per layer).

With `bias_per_rank` E has m*r rows and the bias term is (w ⊗ 1_r) E, as the paper's code
parametrises it: the same functions (basis i's bias is the sum of its r rows), with r
times the parameters. The low-rank path is one autograd function, `StackedLoRA` (below).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from condlora.core.errors import LoRAError
from condlora.lora.composers import stack
from condlora.lora.runtime import ConditionState


class StackedLoRA(torch.autograd.Function):
    """Y = x W^T + b + (x A^T ⊙ ws) B^T + e on the rows of x (its channels: last, or dim 1 of a
    conv input); see the module doc. Y has x's shape with d_out channels (a conv's output in
    x's memory layout). At the digits' widths every op costs about as much as its arithmetic,
    so the function runs few: two matmuls from x, one in-place addmm for the update, and one
    broadcast add for b + e."""

    @staticmethod
    def forward(  # noqa: PLR0913 - the layer's tensors, one argument each
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,  # (S, ..., d_in), or a conv input (S, d_in, *spatial) in either layout
        channels_first: bool,  # x is a conv input: channels at dim 1
        weight: Tensor,  # W (d_out, d_in) or a 1x1 conv kernel (d_out, d_in, 1, ...)
        bias: Tensor | None,  # b (d_out,)
        lora_a: Tensor,  # A (m*r, d_in)
        lora_b: Tensor,  # B (d_out, m*r)
        ws: Tensor,  # s (w ⊗ 1_r) as (S or 1, m*r) or (S or 1, 1, m*r)
        extra: Tensor | None,  # e = s w E as (S or 1, d_out) or (S or 1, 1, d_out), or None
    ) -> Tensor:
        """Y: x's shape with d_out channels."""
        d_out, d_in, rank, samples = weight.shape[0], lora_a.shape[1], lora_a.shape[0], x.shape[0]
        w2 = weight.view(d_out, d_in)
        channels = x.movedim(1, -1) if channels_first else x  # channels last: rows
        rows = channels.reshape(-1, d_in)  # a view unless x is channels-first in memory
        y = F.linear(rows, w2)
        h = F.linear(rows, lora_a)  # (S*N, m*r)
        dtype = h.dtype  # the compute dtype (bf16 under autocast)
        hw = (h.view(samples, -1, rank) * ws.view(-1, 1, rank).to(dtype)).view(-1, rank)
        y.addmm_(hw, lora_b.to(dtype).t())
        shift = None if bias is None else bias.to(dtype)
        if extra is not None:
            e = extra.view(-1, 1, d_out).to(dtype)
            shift = e if shift is None else e + shift
        if shift is not None:
            y.view(samples, -1, d_out).add_(shift)
        ctx.save_for_backward(rows, w2, lora_a, lora_b, h, ws)
        ctx.shapes = (x.shape, weight.shape, None if extra is None else extra.shape)
        ctx.dtypes = (x.dtype, None if extra is None else extra.dtype)
        ctx.has_bias, ctx.channels_first = bias is not None, channels_first
        y = y.view(*channels.shape[:-1], d_out)
        if not channels_first:
            return y
        y = y.movedim(-1, 1)  # a channels-last view
        return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:
        """Gradients for (x, -, W, b, A, B, ws, e), each in its input's shape and dtype."""
        rows, w2, lora_a, lora_b, h, ws = ctx.saved_tensors
        need, dtype, rank = ctx.needs_input_grad, h.dtype, h.shape[1]
        x_shape, weight_shape, extra_shape = ctx.shapes
        samples, d_out = x_shape[0], w2.shape[0]
        if ctx.channels_first:
            grad = grad.movedim(1, -1)
        g = grad.reshape(-1, d_out).to(dtype)  # (S*N, d_out)
        wsd = ws.view(-1, 1, rank).to(dtype)
        grad_hw = g @ lora_b.to(dtype)  # dL/d(H ⊙ ws), (S*N, m*r)
        grad_h = (grad_hw.view(samples, -1, rank) * wsd).view(-1, rank)
        rows_c = rows.to(dtype)
        grads: list[Tensor | None] = [None] * 8
        if need[0]:
            grad_x = torch.addmm(g @ w2.to(dtype), grad_h, lora_a.to(dtype)).to(ctx.dtypes[0])
            if ctx.channels_first:  # (S, *spatial, d_in) -> x's shape, channels-last strides
                grad_x = grad_x.view(samples, *x_shape[2:], -1).movedim(-1, 1)
            grads[0] = grad_x.view(x_shape) if not ctx.channels_first else grad_x
        if need[2]:
            grads[2] = (g.t() @ rows_c).to(w2.dtype).view(weight_shape)
        if need[4]:
            grads[4] = (grad_h.t() @ rows_c).to(lora_a.dtype)
        if need[5]:
            hw = (h.view(samples, -1, rank) * wsd).view(-1, rank)
            grads[5] = (g.t() @ hw).to(lora_b.dtype)
        if need[6]:
            per_sample = (grad_hw * h).view(samples, -1, rank).sum(dim=1)
            grads[6] = _sum_to(per_sample, ws.shape[0], ws.dtype).view(ws.shape)
        sums = g.view(samples, -1, d_out).sum(dim=1) if need[3] or need[7] else None
        if need[3] and ctx.has_bias:
            grads[3] = sums.sum(dim=0).to(w2.dtype)
        if need[7] and extra_shape is not None:
            grads[7] = _sum_to(sums, extra_shape[0], ctx.dtypes[1]).view(extra_shape)
        return tuple(grads)


def _sum_to(grad: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
    """grad (S, k) summed over samples for an input of batch 1, in that input's dtype."""
    if batch == 1 and grad.shape[0] != 1:
        grad = grad.sum(dim=0, keepdim=True)
    return grad.to(dtype)


_CONV = {3: F.conv1d, 4: F.conv2d}  # 1x1 conv by input dimensions


def is_pointwise(conv: nn.Module) -> bool:
    """A 1x1 conv with stride 1, no padding and groups 1: a Linear layer at every position."""
    pointwise = all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride)
    no_pad = conv.padding in ("valid", "same") or all(p == 0 for p in conv.padding)
    return pointwise and no_pad and conv.groups == 1


def check_target(name: str, module: nn.Module) -> None:
    """Raise LoRAError unless `module` is a Linear or a plain 1x1 Conv1d/Conv2d."""
    if isinstance(module, nn.Linear):
        return
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if is_pointwise(module):
            return
        raise LoRAError(
            f"target {name!r} is {module}: only 1x1 convs with stride 1, no padding and "
            "groups=1 can take a LoRA (they act as per-position Linear layers)"
        )
    raise LoRAError(
        f"target {name!r} is a {type(module).__name__}; only nn.Linear and 1x1 nn.Conv1d / "
        "nn.Conv2d can be wrapped (narrow the target pattern)"
    )


# The merged weight W + dW costs d_out*d_in*m*r multiply-adds once per call, the low-rank
# path (d_in + d_out)*m*r per position plus a few small ops whatever the size. Measured
# (benchmarks/merge_threshold.py, docs/PERFORMANCE.md), the small ops are worth about
# MERGE_OVERHEAD positions*(d_in + d_out): with it the rule below picks the faster path in
# every measured cell (widths 64-512, 4-1024 positions), where the flop rule alone missed 4
# of 19 (narrow layers merge even for a few positions).
MERGE_OVERHEAD = 50_000


def merge_pays(positions: int, d_in: int, d_out: int) -> bool:
    """Is W + dW cheaper than the low-rank path for `positions` rows of one call?"""
    return positions * (d_in + d_out) + MERGE_OVERHEAD >= d_in * d_out


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
        if rank != state.config.rank:
            raise LoRAError(f"rank {rank} differs from the condition state's {state.config.rank}")
        self.base_layer = base_layer
        self.is_conv = not isinstance(base_layer, nn.Linear)
        weight = base_layer.weight
        d_out, d_in = weight.shape[:2]
        m = composer.num_weights
        self.rank, self.num_bases, self.scale = rank, m, scale
        self.composer = composer.to(device=weight.device, dtype=weight.dtype)
        self.state = state
        self.index = state.register(self)  # this wrapper's place in the state
        kw = {"device": weight.device, "dtype": weight.dtype}
        # A ~ N(0, (1/r)^2), B = 0, E = 0: a fresh wrapper computes the base layer. On the
        # meta device (a parameter count) nothing is drawn: torch's first random op there
        # costs seconds of imports.
        shape = (m * rank, d_in)
        a = torch.empty(shape, **kw) if weight.is_meta else torch.randn(shape, **kw) / rank
        self.lora_A = nn.Parameter(a)
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
        """Base output plus the LoRA update at the current condition (skipped while merged).

        Without gradients, when every row of w(c) is the same (the batch shares its noise
        level and class) and a merged weight is the cheaper path, W + dW(w) is applied as
        one weight; otherwise the low-rank path runs.
        """
        if self.merged:
            return self.base_layer(x)
        d_out, d_in = self.lora_B.shape[0], self.lora_A.shape[1]
        cheaper = merge_pays(x.numel() // d_in, d_in, d_out)
        if not torch.is_grad_enabled() and cheaper and self.state.shared():
            self._check_input(x)
            return self._forward_merged(x)
        ws, w = self.state.lora_weights(self.index)  # w ⊗ 1_r, w
        self._check_input(x)
        self._check_weights(x, w)
        return self._forward_lowrank(x, ws, w)

    def _check_input(self, x: Tensor) -> None:
        needed = self.base_layer.weight.dim() if self.is_conv else 2  # (B, C, *spatial)
        if x.dim() < needed or (self.is_conv and x.dim() != needed):
            raise LoRAError(f"{self._kind()} LoRA needs batched input, got shape {tuple(x.shape)}")

    def _check_weights(self, x: Tensor, w: Tensor) -> None:
        if w.dim() != 2 or w.shape[1] != self.num_bases:
            raise LoRAError(
                f"basis weights must be (batch, {self.num_bases}), got {tuple(w.shape)}"
            )
        if w.shape[0] not in (1, x.shape[0]):
            raise LoRAError(f"condition batch {w.shape[0]} does not match input batch {x.shape[0]}")

    def _forward_lowrank(self, x: Tensor, ws: Tensor, w: Tensor) -> Tensor:
        """W x + b + s B ((w ⊗ 1_r) ⊙ A x) + s w E: `StackedLoRA`, on x as it is (a conv
        input in either memory layout)."""
        base = self.base_layer
        if self.scale != 1.0:  # (x * 1.0 is exact: skipped, as the op and its graph node)
            ws, w = ws * self.scale, w * self.scale
        extra = None
        if self.lora_E is not None:
            extra = self._bias_weights(ws, w) @ self.lora_E
        return StackedLoRA.apply(
            x, self.is_conv, base.weight, base.bias, self.lora_A, self.lora_B, ws, extra
        )

    def _forward_merged(self, x: Tensor) -> Tensor:
        """The base layer's op with weight W + s B diag(w ⊗ 1_r) A and bias b + s w E at the
        batch's one condition (`ConditionState.merged_weights`: formed once per call, with
        the other wrappers of this shape), so the LoRA costs nothing per position."""
        weight, bias = self.state.merged_weights(self.index)
        if not self.is_conv:
            return F.linear(x, weight, bias)
        return _CONV[x.dim()](x, weight, bias)

    def merge_key(self) -> tuple:
        """Wrappers with equal keys can form their merged weights together (`merged_group`)."""
        e_shape = None if self.lora_E is None else tuple(self.lora_E.shape)
        base = self.base_layer
        return (self.is_conv, tuple(base.weight.shape), tuple(self.lora_A.shape), e_shape) + (
            base.bias is None,
            self.scale,
        )

    @staticmethod
    def merged_group(
        layers: list[CondLoRALayer], w: Tensor, stacks: Callable = stack
    ) -> list[tuple[Tensor, Tensor | None]]:
        """(W + s B diag(w ⊗ 1_r) A, b + s w E) of each of L wrappers with one `merge_key`, at
        one condition each (w (L, m)), in a few batched ops whatever L: the updates dW as one
        batched matmul, added to the L base weights in one foreach op (the base weights are
        not copied or stacked). Exactly W and b while B = 0 and E = 0."""
        first, count = layers[0], len(layers)
        m, r = first.num_bases, first.rank
        bases = [layer.base_layer for layer in layers]
        if first.scale != 1.0:  # (x * 1.0 is exact: skipped)
            w = w * first.scale
        lora_b = stacks(layers, "lora_B")  # (L, d_out, m*r)
        # B diag(w ⊗ 1_r): columns i*r .. i*r + r-1 of B times w_i, without forming w ⊗ 1_r
        w_cols = w.to(lora_b.dtype).view(count, 1, m, 1)
        scaled_b = (lora_b.view(count, -1, m, r) * w_cols).view(lora_b.shape)
        delta = torch.bmm(scaled_b, stacks(layers, "lora_A"))
        delta = delta.view(count, *first.base_layer.weight.shape).unbind(0)
        weights = torch._foreach_add([base.weight for base in bases], delta)
        if not first.is_conv:  # torch's matmul picks its kernel by the weight's requires_grad,
            # even without gradients: W's flag, so that a fresh LoRA (dW = 0) gives W's bits
            for weight, base in zip(weights, bases, strict=True):
                if not weight.requires_grad:
                    weight.requires_grad_(base.weight.requires_grad)
        biases = [base.bias for base in bases]
        if first.lora_E is not None:
            lora_e = stacks(layers, "lora_E")  # (L, m or m*r, d_out)
            bias_w = w if lora_e.shape[1] == m else w.repeat_interleave(r, dim=-1)
            bias_w = bias_w.to(lora_e.dtype).unsqueeze(1)  # (L, 1, rows of E); bf16 (autocast)
            if biases[0] is None:
                biases = torch.bmm(bias_w, lora_e).view(count, -1).unbind(0)
            else:
                bias = torch.baddbmm(stacks(layers, "base_layer.bias").unsqueeze(1), bias_w, lora_e)
                biases = bias.view(count, -1).unbind(0)
        return list(zip(weights, biases, strict=True))

    def single_condition_weights(self, w: Tensor) -> Tensor:
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
        ws = (self.single_condition_weights(w).to(self.lora_B) * self.scale).repeat_interleave(
            self.rank
        )
        delta = (self.lora_B * ws) @ self.lora_A
        return delta.reshape(self.base_layer.weight.shape)

    def get_delta_bias(self, w: Tensor) -> Tensor | None:
        """db = s * w E at one condition (None without per-basis bias)."""
        if self.lora_E is None:
            return None
        w = self.single_condition_weights(w).to(self.lora_E) * self.scale
        return self._bias_weights(w.repeat_interleave(self.rank), w) @ self.lora_E

    def _bias_weights(self, ws: Tensor, w: Tensor) -> Tensor:
        """The weights of E's rows: w, or w ⊗ 1_r when E has one row per rank-1 component."""
        return w if self.lora_E.shape[0] == self.num_bases else ws

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
