"""The low-rank path of a conditional LoRA layer as one autograd function.

For x laid out as rows, (S, N, d_in) (S samples, N positions each), or channels first,
(S, d_in, *spatial) for a 1x1 conv (then the stacked product is a 1x1 conv too, so the
base output has the bits of the base conv), with Y returned as rows (S, N, d_out):

    [Y0 | H] = x [W; A]^T + [b; 0]            one matmul for the base output and A x
    Y        = Y0 + (H ⊙ ws) B^T + e          ws = s (w ⊗ 1_r), e = s w E, per sample

Backward, with G = dL/dY and G_H = (G B) ⊙ ws:

    dL/d[W; A] = [G | G_H]^T x                one matmul for both weights
    dL/dx      = [G | G_H] [W; A]             one matmul
    dL/dB      = G^T (H ⊙ ws),  dL/dws = sum over positions of (G B) ⊙ H,  dL/de = sum of G

Only x (which the host keeps anyway) and H (N x m*r per sample) are saved: neither the
base output nor H ⊙ ws stays alive for the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

_CONV = {3: F.conv1d, 4: F.conv2d}  # 1x1 conv by input dimensions


class StackedLoRA(torch.autograd.Function):
    """Y = x W^T + b + (x A^T ⊙ ws) B^T + e, as rows (S, N, d_out); see the module doc."""

    @staticmethod
    def forward(  # noqa: PLR0913 - the layer's tensors, one argument each
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,  # rows (S, N, d_in), or channels first (S, d_in, *spatial)
        channels_first: bool,  # which of the two
        weight: Tensor,  # W (d_out, d_in)
        bias: Tensor | None,  # b (d_out,)
        lora_a: Tensor,  # A (m*r, d_in)
        lora_b: Tensor,  # B (d_out, m*r)
        ws: Tensor,  # s (w ⊗ 1_r) as (S or 1, 1, m*r)
        extra: Tensor | None,  # e = s w E as (S or 1, 1, d_out), or None
    ) -> Tensor:
        """Y (S, N, d_out)."""
        d_out, rank = weight.shape[0], lora_a.shape[0]
        stacked = torch.cat([weight, lora_a])
        bias = None if bias is None else F.pad(bias, (0, rank))
        if channels_first:
            kernel = stacked.view(*stacked.shape, *[1] * (x.dim() - 2))
            out = _CONV[x.dim()](x, kernel, bias).movedim(1, -1)
            out = out.reshape(x.shape[0], -1, d_out + rank)
        else:
            out = F.linear(x, stacked, bias)
        h = out[..., d_out:].contiguous()  # saved alone: the wide output can be freed
        dtype = h.dtype  # the compute dtype (bf16 under autocast)
        hw = (h * ws.to(dtype)).view(-1, rank)
        y = torch.addmm(out.reshape(-1, d_out + rank)[:, :d_out], hw, lora_b.to(dtype).t())
        y = y.view(*out.shape[:-1], d_out)
        if extra is not None:
            y += extra.to(dtype)
        ctx.save_for_backward(x, stacked, lora_b, h, ws)
        ctx.d_out, ctx.has_bias, ctx.channels_first = d_out, bias is not None, channels_first
        ctx.extra = None if extra is None else (extra.shape[0], extra.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:
        """Gradients for (x, -, W, b, A, B, ws, e), each in its input's dtype."""
        x, stacked, lora_b, h, ws = ctx.saved_tensors
        need, d_out, dtype = ctx.needs_input_grad, ctx.d_out, h.dtype
        grad, wsd = grad.to(dtype), ws.to(dtype)
        grad_hw = grad @ lora_b.to(dtype)  # dL/d(H ⊙ ws), (S, N, m*r)
        grad_out = torch.cat([grad, grad_hw * wsd], dim=-1)  # [G | G_H]
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        x_rows = x.movedim(1, -1) if ctx.channels_first else x
        x_rows = x_rows.reshape(-1, x_rows.shape[-1]).to(dtype)
        grads: list[Tensor | None] = [None] * 8
        if need[0]:
            grad_x = (rows @ stacked.to(dtype)).to(x.dtype)
            if ctx.channels_first:  # back to (S, d_in, *spatial)
                grad_x = grad_x.view(x.shape[0], *x.shape[2:], -1).movedim(-1, 1)
            grads[0] = grad_x.view(x.shape)
        if need[2]:  # base weight trainable too: both weights in one matmul
            grad_stacked = (rows.t() @ x_rows).to(stacked.dtype)
            grads[2], grads[4] = grad_stacked[:d_out], grad_stacked[d_out:]
        elif need[4]:
            grads[4] = (rows[:, d_out:].t() @ x_rows).to(stacked.dtype)
        if need[5]:
            hw = (h * wsd).reshape(-1, h.shape[-1])
            grads[5] = (rows[:, :d_out].t() @ hw).to(lora_b.dtype)
        if need[6]:
            grads[6] = _sum_to((grad_hw * h).sum(dim=1, keepdim=True), ws.shape[0], ws.dtype)
        sums = grad.sum(dim=1, keepdim=True) if need[3] or need[7] else None
        if need[3] and ctx.has_bias:
            grads[3] = sums.sum(dim=(0, 1)).to(stacked.dtype)
        if need[7] and ctx.extra is not None:
            grads[7] = _sum_to(sums, *ctx.extra)
        return tuple(grads)


def _sum_to(grad: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
    """grad (S, 1, k) summed over samples for an input of batch 1, in that input's dtype."""
    if batch == 1 and grad.shape[0] != 1:
        grad = grad.sum(dim=0, keepdim=True)
    return grad.to(dtype)
