"""Residual MLP blocks over vectors (B, W) or tokens (B, T, W), with optional time and condition.

One block class serves the VAE (no time, no condition) and the vector denoiser:

    h <- h + t_proj(SiLU(t_emb))                 time, when time_dim > 0 (same in every mode)
    x  = LayerNorm(h)
    x  = modulation(x, c)                        condition, when cond_mode is not "none"
    h <- h + fc2(Dropout(SiLU(fc1(x))))

The modulation reads c, the (B, cond_dim) condition embedding that the host network
computes once, and makes its own per-block parameters from SiLU(c) with one Linear:

    "adanorm"  x * (1 + scale(c)) + shift(c)                  (scale-shift norm, zero-init)
    "adalora"  x + (x A(c)) B(c)^T,  A(c), B(c): (W, r) per sample   (LoRA Diffusion's ADALoRA)

With the Linear on the host's c = Linear(SiLU(Linear(LayerNorm(e)))) of the raw condition
e, ADALoRA's factors are `[A; B] = MLP(LayerNorm(e))` as the paper writes them. The part of
each head that makes scale/shift or B(c) starts at zero, so a fresh block ignores c exactly.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condlora.core.errors import ConfigError

BLOCK_COND_MODES = ("none", "adanorm", "adalora")


def per_sample(v: Tensor, x: Tensor) -> Tensor:
    """(B, W) -> (B, 1, ..., 1, W) so that it broadcasts over the token axes of x (B, ..., W)."""
    return v.reshape(v.shape[0], *([1] * (x.dim() - 2)), v.shape[-1])


class AdaNorm(nn.Module):
    """x * (1 + scale(c)) + shift(c), with [scale, shift] = Linear(SiLU(c)) starting at zero."""

    def __init__(self, cond_dim: int, width: int) -> None:
        super().__init__()
        self.head = nn.Linear(cond_dim, 2 * width)
        nn.init.zeros_(self.head.weight)  # fresh: scale = shift = 0, the identity
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, ..., W) normalised activations, c (B, cond_dim) -> (B, ..., W)."""
        scale, shift = self.head(F.silu(c)).chunk(2, dim=-1)
        return x * (1 + per_sample(scale, x)) + per_sample(shift, x)


class AdaLoRA(nn.Module):
    """x + (x A(c)) B(c)^T: a rank-r map generated per sample, [A; B] = Linear(SiLU(c))."""

    def __init__(self, cond_dim: int, width: int, rank: int) -> None:
        super().__init__()
        self.width, self.rank = width, rank
        self.head = nn.Linear(cond_dim, 2 * width * rank)  # rows: A (W*r) then B (W*r)
        with torch.no_grad():
            # A part: entries ~1/sqrt(W) smaller, so x A stays O(1) for unit-scale x
            self.head.weight[: width * rank] /= math.sqrt(width)
            self.head.bias[: width * rank] /= math.sqrt(width)
            # B part: zero, so a fresh map adds nothing (as LoRA's B = 0)
            self.head.weight[width * rank :] = 0
            self.head.bias[width * rank :] = 0

    def factors(self, c: Tensor) -> tuple[Tensor, Tensor]:
        """A(c), B(c), each (B, W, r)."""
        a, b = self.head(F.silu(c)).chunk(2, dim=-1)
        shape = (c.shape[0], self.width, self.rank)
        return a.reshape(shape), b.reshape(shape)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, ..., W), c (B, cond_dim) -> x + (x A) B^T per sample, (B, ..., W)."""
        a, b = self.factors(c)
        u = torch.einsum("b...w,bwr->b...r", x, a.to(x.dtype))
        return x + torch.einsum("b...r,bwr->b...w", u, b.to(x.dtype))


class ResMLPBlock(nn.Module):
    """Pre-norm residual MLP block; time is added to h, the condition modulates LayerNorm(h)."""

    def __init__(
        self,
        width: int,  # W, width of the residual stream
        mlp_ratio: float = 2.0,  # hidden width of fc1/fc2 = mlp_ratio * W
        dropout: float = 0.0,  # between SiLU and fc2
        time_dim: int = 0,  # width of the time embedding; 0: no time input
        cond_dim: int = 0,  # width of the condition embedding c; needed unless cond_mode "none"
        cond_mode: str = "none",  # "none" | "adanorm" | "adalora"
        rank: int = 4,  # r of ADALoRA
    ) -> None:
        super().__init__()
        if cond_mode not in BLOCK_COND_MODES:
            raise ConfigError(f"block cond_mode must be in {BLOCK_COND_MODES}, got {cond_mode!r}")
        if cond_mode != "none" and cond_dim < 1:
            raise ConfigError(f"cond_mode {cond_mode!r} needs cond_dim >= 1, got {cond_dim}")
        hidden = max(1, round(mlp_ratio * width))
        self.time_proj = nn.Linear(time_dim, width) if time_dim else None
        self.norm = nn.LayerNorm(width)
        self.modulation: nn.Module | None = None
        if cond_mode == "adanorm":
            self.modulation = AdaNorm(cond_dim, width)
        elif cond_mode == "adalora":
            self.modulation = AdaLoRA(cond_dim, width, rank)
        self.fc1 = nn.Linear(width, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, h: Tensor, t_emb: Tensor | None = None, c: Tensor | None = None) -> Tensor:
        """h (B, ..., W), t_emb (B, time_dim), c (B, cond_dim) -> (B, ..., W)."""
        if self.time_proj is not None:
            if t_emb is None:
                raise ConfigError("this block was built with a time input; pass t_emb")
            h = h + per_sample(self.time_proj(F.silu(t_emb)), h)
        x = self.norm(h)
        if self.modulation is not None:
            if c is None:
                raise ConfigError("this block was built with a condition input; pass c")
            x = self.modulation(x, c)
        return h + self.fc2(self.dropout(F.silu(self.fc1(x))))


class ResMLP(nn.Module):
    """Linear in -> residual MLP blocks -> LayerNorm -> Linear out (VAE encoder/decoder, prior)."""

    def __init__(
        self,
        dim_in: int,  # input width
        width: int,  # residual stream width
        depth: int,  # number of ResMLPBlocks
        dim_out: int,  # output width
        zero_out: bool = False,  # zero-initialise the output Linear (a fresh net outputs 0)
        **block: float | int | str,  # ResMLPBlock options: mlp_ratio, dropout, time_dim, ...
    ) -> None:
        super().__init__()
        self.stem = nn.Linear(dim_in, width)
        self.blocks = nn.ModuleList(ResMLPBlock(width, **block) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim_out)
        if zero_out:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t_emb: Tensor | None = None, c: Tensor | None = None) -> Tensor:
        """x (B, ..., dim_in) -> (B, ..., dim_out); t_emb and c go to every block."""
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, t_emb, c)
        return self.out(self.out_norm(h))
