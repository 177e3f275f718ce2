"""VectorDenoiser: a conditional denoiser for vectors (B, D), the latent diffusion prior.

It is a backbone for `condlora.diffusion.Denoiser`, which calls
`net(c_in * x, noise_labels, **cond)`; here `cond` is `embedding=` (and `drop=`).

Two paths, computed once per forward and read by every block:
    time       t_emb = Linear(SiLU(Linear(sinusoid(noise_label))))    (B, width)
               Every block adds its own Linear(SiLU(t_emb)) to the residual stream, in
               every cond_mode alike, so the modes differ only in how the condition enters.
    condition  c = Linear(SiLU(Linear(LayerNorm(e))))                  (B, cond_width)
               from the raw condition e (B, cond_dim), e.g. an identity embedding.

cond_mode (how c enters each block; see the block below):
    "adalora"  LayerNorm(h) + (LayerNorm(h) A(c)) B(c)^T, per-sample rank-r factors
    "adanorm"  LayerNorm(h) * (1 + scale(c)) + shift(c)
    "uc_lora"  plain blocks; c is computed by `cond_embed` but feeds nothing inside the net:
               UC-LoRA adapters injected from outside on the blocks' fc1/fc2 read it through
               a hook on `cond_embed` (`condlora.synthesis.model.build_prior_net`)
    "none"     unconditional: no condition path at all

No condition (classifier-free guidance): `embedding=None` makes the whole batch
unconditional, and `drop` (bool (B,), True = drop) makes single rows unconditional. Either
way the row's condition is replaced by a learned null embedding before the condition path,
so dropped rows in training and unconditional calls at sampling see the same input.

The output Linear starts at zero: a fresh net outputs 0 (for v-prediction D = c_skip x).
Its blocks (`ResMLPBlock`, also the VAE's with no time and no condition):

    h <- h + t_proj(SiLU(t_emb))                 time, when time_dim > 0 (same in every mode)
    x  = LayerNorm(h)
    x  = modulation(x, c)                        condition, when cond_mode is not "none"
    h <- h + fc2(Dropout(SiLU(fc1(x))))

The modulation makes its own per-block parameters from SiLU(c) with one Linear:

    "adanorm"  x * (1 + scale(c)) + shift(c)                  (scale-shift norm, zero-init)
    "adalora"  x + (x A(c)) B(c)^T,  A(c), B(c): (W, r) per sample   (LoRA Diffusion's ADALoRA)

With the Linear on the host's c = Linear(SiLU(Linear(LayerNorm(e)))), ADALoRA's factors are
`[A; B] = MLP(LayerNorm(e))` as the paper writes them. The part of each head that makes
scale/shift or B(c) starts at zero, so a fresh block ignores c exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condlora.core.config import Checked, OneOf, Range
from condlora.core.errors import ConfigError
from condlora.nets.unet import sinusoidal_embedding

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


VECTOR_COND_MODES = ("adalora", "adanorm", "uc_lora", "none")
VECTOR_ARCHS = ("mlp", "transformer")


@dataclass
class VectorNetConfig(Checked):
    """Settings of a VectorDenoiser; enough to rebuild it exactly."""

    dim: int = 512  # D, length of the vectors (a VAE latent, or a raw LoRA vector)
    width: int = 1024  # residual stream width (per token for the transformer)
    depth: int = 6  # residual blocks (transformer: layers of block + attention)
    mlp_ratio: float = 2.0  # hidden width of each block's MLP = mlp_ratio * width
    dropout: float = 0.0  # dropout inside each block's MLP
    cond_mode: str = "adalora"  # "adalora" | "adanorm" | "uc_lora" | "none"
    cond_dim: int = 512  # E, width of the raw condition given as `embedding` (ArcFace: 512)
    cond_width: int = 256  # width of the condition embedding c that every block reads
    rank: int = 4  # r of ADALoRA (and the default rank of the UC-LoRA bases)
    time_channels: int = 128  # width of the sinusoidal embedding of the noise label
    arch: str = "mlp"  # "mlp" | "transformer" (tokens of `chunk` consecutive numbers)
    chunk: int = 64  # transformer: numbers per token; must divide dim
    heads: int = 4  # transformer: attention heads; must divide width

    CHECKS: ClassVar[dict] = {
        "cond_mode": OneOf(VECTOR_COND_MODES),
        "arch": OneOf(VECTOR_ARCHS),
        **{name: Range(1, 2**24) for name in ("dim", "width", "depth", "cond_width", "rank")},
        **{name: Range(1, 2**24) for name in ("time_channels", "chunk", "heads")},
        "mlp_ratio": Range(0, 1024, low_open=True),
        "dropout": Range(0, 1, high_open=True),
    }

    def check(self, key: Callable[[str], str]) -> None:
        """The condition width, the even sinusoid, the transformer's divisibility."""
        if self.cond_mode != "none" and self.cond_dim < 1:
            raise ConfigError(f"{key('cond_dim')} must be >= 1, got {self.cond_dim}")
        if self.time_channels % 2:
            raise ConfigError(f"{key('time_channels')} must be even, got {self.time_channels}")
        if self.arch == "transformer" and self.dim % self.chunk:
            raise ConfigError(f"transformer: chunk {self.chunk} does not divide dim {self.dim}")
        if self.arch == "transformer" and self.width % self.heads:
            raise ConfigError(f"transformer: heads {self.heads} do not divide width {self.width}")

    def block_options(self) -> dict:
        """ResMLPBlock keyword arguments (uc_lora blocks are plain: LoRA comes from outside)."""
        mode = self.cond_mode if self.cond_mode in ("adalora", "adanorm") else "none"
        return {
            "mlp_ratio": self.mlp_ratio,
            "dropout": self.dropout,
            "time_dim": self.width,
            "cond_dim": self.cond_width if mode != "none" else 0,
            "cond_mode": mode,
            "rank": self.rank,
        }


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over tokens, residual; starts as the identity."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: Tensor) -> Tensor:
        """h (B, T, W) -> (B, T, W)."""
        b, t, w = h.shape
        qkv = self.qkv(self.norm(h)).reshape(b, t, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, W/heads)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, w)
        return h + self.proj(out)


class ChunkTransformer(nn.Module):
    """D numbers -> D/chunk tokens -> layers of (ResMLPBlock, SelfAttention) -> D numbers."""

    def __init__(self, config: VectorNetConfig) -> None:
        super().__init__()
        self.chunk, width = config.chunk, config.width
        self.stem = nn.Linear(config.chunk, width)
        self.pos = nn.Parameter(torch.randn(config.dim // config.chunk, width) * 0.02)
        options = config.block_options()
        self.blocks = nn.ModuleList(ResMLPBlock(width, **options) for _ in range(config.depth))
        self.attns = nn.ModuleList(SelfAttention(width, config.heads) for _ in range(config.depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, config.chunk)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t_emb: Tensor, c: Tensor | None) -> Tensor:
        """x (B, D), t_emb (B, width), c (B, cond_width) or None -> (B, D)."""
        h = self.stem(x.reshape(x.shape[0], -1, self.chunk)) + self.pos
        for block, attn in zip(self.blocks, self.attns, strict=True):
            h = attn(block(h, t_emb, c))
        return self.out(self.out_norm(h)).reshape(x.shape)


class VectorDenoiser(nn.Module):
    """F(x, noise_labels, embedding, drop) for vectors (B, D); see the module docstring."""

    def __init__(self, config: VectorNetConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.time_embed = nn.Sequential(
            nn.Linear(config.time_channels, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.conditioned = config.cond_mode != "none"
        if self.conditioned:
            e, cw = config.cond_dim, config.cond_width
            # learned stand-in for a dropped / absent condition (unit norm in expectation)
            self.null_embedding = nn.Parameter(torch.randn(e) / e**0.5)
            # UC-LoRA's emb_module: its output c is what the injected composers read
            self.cond_embed = nn.Sequential(
                nn.LayerNorm(e), nn.Linear(e, cw), nn.SiLU(), nn.Linear(cw, cw)
            )
        if config.arch == "mlp":
            options = config.block_options()
            dim, depth = config.dim, config.depth
            self.body = ResMLP(dim, width, depth, dim, zero_out=True, **options)
        else:
            self.body = ChunkTransformer(config)

    def condition(self, batch: int, embedding: Tensor | None, drop: Tensor | None) -> Tensor:
        """The raw condition (B, cond_dim) with absent / dropped rows set to the null embedding."""
        null = self.null_embedding.expand(batch, -1)
        if embedding is None:
            return null
        if embedding.dim() != 2 or embedding.shape != null.shape:
            raise ConfigError(
                f"embedding must have shape ({batch}, {self.config.cond_dim}), "
                f"got {tuple(embedding.shape)}"
            )
        embedding = embedding.to(null.dtype)
        if drop is None:
            # no row dropped; still through torch.where, so the null embedding takes part in
            # every graph (DDP without find_unused_parameters needs every parameter used)
            drop = torch.zeros(batch, dtype=torch.bool, device=embedding.device)
        if drop.shape != (batch,):
            raise ConfigError(f"drop must be a ({batch},) bool mask, got {tuple(drop.shape)}")
        return torch.where(drop.to(embedding.device, torch.bool)[:, None], null, embedding)

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        embedding: Tensor | None = None,
        drop: Tensor | None = None,
    ) -> Tensor:
        """x (B, D), noise labels (B,) or scalar, embedding (B, cond_dim), drop (B,) -> (B, D)."""
        if x.dim() != 2 or x.shape[1] != self.config.dim:
            raise ConfigError(f"x must have shape (batch, {self.config.dim}), got {tuple(x.shape)}")
        labels = torch.as_tensor(noise_labels, device=x.device).reshape(-1).expand(x.shape[0])
        sinusoid = sinusoidal_embedding(labels, self.config.time_channels)
        t_emb = self.time_embed(sinusoid.to(self.time_embed[0].weight.dtype))
        c = None
        if self.conditioned:
            c = self.cond_embed(self.condition(x.shape[0], embedding, drop))
        elif embedding is not None or drop is not None:
            raise ConfigError("this denoiser is unconditional (cond_mode 'none'); got an embedding")
        return self.body(x, t_emb, c)
