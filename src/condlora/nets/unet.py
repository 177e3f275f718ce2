"""SmallUNet: an ADM-style U-Net small enough to train on a laptop CPU.

Reads top to bottom: helpers (group count, sinusoidal embedding), the noise/class
embedding `embed`, the residual block, the attention block, then the U-Net.

Conditioning (`cond_mode`):
    "scale_shift"  each residual block maps the embedding to (scale, shift) and
                   applies `norm(h) * (1 + scale) + shift` (IDDPM/ADM use_scale_shift_norm).
    "lora_only"    residual blocks have no embedding projection at all; the condition
                   reaches the net only through LoRA adapters added from outside on the
                   attention layers (`qkv`, `proj`). With `keep_embedding=True` the
                   `embed` module is still run every forward so that a hook on it can read
                   the (B, emb_dim) embedding (UC-LoRA); its output feeds nothing inside
                   the net. With `keep_embedding=False` there is no `embed` at all.
    "both"         the same layers as "scale_shift"; LoRA is added from outside too
                   (the paper's "with LoRA" setting).

This file holds no LoRA code: adapters wrap `qkv`/`proj` from `condlora.lora`.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from condlora.core.labels import class_weights

COND_MODES = ("scale_shift", "lora_only", "both")


def check_unet_args(
    cond_mode: str, img_resolution: int, num_levels: int, patch_size: int = 1
) -> None:
    """Raise ValueError for an unknown cond_mode or a size the levels cannot halve evenly."""
    if cond_mode not in COND_MODES:
        raise ValueError(f"cond_mode must be one of {COND_MODES}, got {cond_mode!r}")
    factor = patch_size * 2 ** (num_levels - 1)
    if img_resolution % factor:
        patch = f"patch_size {patch_size} x " if patch_size > 1 else ""
        raise ValueError(
            f"img_resolution {img_resolution} not divisible by {patch}2^{num_levels - 1}"
        )


def group_norm(
    channels: int, max_groups: int = 32, min_channels_per_group: int = 4
) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides `channels`."""
    groups = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


def sinusoidal_embedding(
    labels: torch.Tensor, dim: int, max_period: float = 10000.0
) -> torch.Tensor:
    """Transformer positional embedding of float labels (B,) -> (B, dim), cos half then sin half.

    Frequencies run geometrically from 1 down to 1/max_period (both endpoints included), so
    index-scale labels (a DDPM timestep in [0, 999]) are resolved by the low frequencies and
    small labels (EDM c_noise = ln(sigma)/4, about [-2, 2]) by the high ones (frequency 1
    rad per unit), as in EDM's PositionalEmbedding. Labels are used unscaled.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=labels.device) / max(half - 1, 1)
    freqs = max_period ** (-exponent)
    angles = labels.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class Embedding(nn.Module):
    """Noise-level (and class) embedding: sinusoid -> Linear, + class Linear, SiLU -> Linear."""

    def __init__(
        self,
        noise_channels: int,  # width of the sinusoidal noise embedding
        emb_dim: int,  # output width
        num_classes: int = 0,  # 0: no class input
    ) -> None:
        super().__init__()
        self.noise_channels = noise_channels
        self.num_classes = num_classes
        self.noise_fc = nn.Linear(noise_channels, emb_dim)
        # Bias-free Linear on a one-hot, so float class weights (mixtures, a zero row for the
        # null class of classifier-free guidance) work the same way as integer labels.
        self.class_fc = nn.Linear(num_classes, emb_dim, bias=False) if num_classes else None
        self.out_fc = nn.Linear(emb_dim, emb_dim)  # last layer: out_features == emb_dim

    def forward(
        self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B,) noise labels and optional (B,) long / (B, num_classes) float classes -> (B, E)."""
        emb = self.noise_fc(sinusoidal_embedding(noise_labels, self.noise_channels))
        if self.class_fc is not None and class_labels is not None:
            weights = class_weights(class_labels, self.num_classes)
            emb = emb + self.class_fc(weights.to(emb.dtype))
        return self.out_fc(F.silu(emb))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv3x3, [scale/shift from emb], GroupNorm-SiLU-Dropout-Conv3x3, + skip."""

    def __init__(
        self,
        in_channels: int,  # input width
        out_channels: int,  # output width
        emb_dim: int = 0,  # 0: no embedding projection (lora_only)
        dropout: float = 0.0,  # before the second conv
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels) if emb_dim else None
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # the block starts as its skip path (ADM)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, Cin, H, W), emb (B, E) or None -> (B, Cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb_proj is not None:
            scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        skip = x if self.skip is None else self.skip(x)
        return (skip + h) / math.sqrt(2)


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions; `qkv` and `proj` are the LoRA targets."""

    def __init__(
        self,
        channels: int,  # width, split evenly over heads
        num_heads: int = 1,  # attention heads
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)  # the block starts as the identity (ADM/EDM)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Stride-2 Conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then Conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@dataclass
class BlockPlan:
    """One step of a U-Net level: a residual block cin -> cout, maybe attention, maybe resample."""

    cin: int
    cout: int
    attn: bool  # attention after the residual block
    resample: str | None = None  # "down": a Downsample step (no block); "up": Upsample after


def encoder_plan(
    resolution: int,
    model_channels: int,
    channel_mult: tuple,
    num_blocks: int,
    attn_resolutions: tuple,
) -> tuple[list[BlockPlan], list[int], int, int]:
    """Per level num_blocks x (ResBlock [+ Attn]), then a Downsample; every output is a skip.

    Returns (steps, skip channels including the input conv's, channels, bottom resolution);
    the ADM layout that SmallUNet and ADMUNet share.
    """
    steps, skips, ch = [], [model_channels], model_channels
    for level, mult in enumerate(channel_mult):
        for _ in range(num_blocks):
            steps.append(BlockPlan(ch, model_channels * mult, resolution in attn_resolutions))
            ch = model_channels * mult
            skips.append(ch)
        if level < len(channel_mult) - 1:
            steps.append(BlockPlan(ch, ch, False, "down"))
            skips.append(ch)
            resolution //= 2
    return steps, skips, ch, resolution


def decoder_plan(
    ch: int,
    resolution: int,
    skips: list[int],
    model_channels: int,
    channel_mult: tuple,
    num_blocks: int,
    attn_resolutions: tuple,
) -> list[BlockPlan]:
    """Per level (num_blocks + 1) x (concat a skip, ResBlock [+ Attn]), then an Upsample."""
    steps, skips = [], list(skips)
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_blocks + 1):
            up = level > 0 and i == num_blocks
            attn = resolution in attn_resolutions
            steps.append(
                BlockPlan(ch + skips.pop(), model_channels * mult, attn, "up" if up else None)
            )
            ch = model_channels * mult
            resolution *= 2 if up else 1
    return steps


class SmallUNet(nn.Module):
    """ADM-style U-Net for small images: forward(x, noise_labels, class_labels) -> (B, Cout, H, W).

    `noise_labels` (B,) float: EDM c_noise or a DDPM timestep index, embedded unscaled (see
    `sinusoidal_embedding`). `class_labels`: None, long (B,), or float (B, num_classes)
    weights; None (or an all-zero row) is the null class.
    """

    def __init__(
        self,
        img_resolution: int = 16,  # input H = W
        in_channels: int = 1,  # image channels in
        out_channels: int = 1,  # image channels out
        model_channels: int = 16,  # base width (16: ~0.44M params at these defaults)
        channel_mult: tuple = (1, 2, 2),  # width multiplier per resolution level
        num_blocks: int = 2,  # residual blocks per level (decoder: num_blocks + 1)
        attn_resolutions: tuple = (8,),  # resolutions with attention after each resblock
        num_heads: int = 1,  # attention heads
        num_classes: int = 0,  # 0: unconditional
        cond_mode: str = "scale_shift",  # "scale_shift" | "lora_only" | "both"
        keep_embedding: bool = True,  # lora_only: still run `embed` (UC-LoRA hooks it)
        dropout: float = 0.0,  # residual-block dropout
        emb_mult: int = 4,  # embedding width = model_channels * emb_mult
        noise_channels: int | None = None,  # sinusoid width (None: the embedding width)
        patch_size: int = 1,  # p: the net runs on p x p pixel patches (pixel unshuffle)
    ) -> None:
        super().__init__()
        levels = len(channel_mult)
        check_unet_args(cond_mode, img_resolution, levels, patch_size)
        self.img_resolution = img_resolution
        self.num_levels = levels
        self.patch_size = patch_size
        # Pixel unshuffle: p x p patches become channels, so every level runs at 1/p the
        # resolution (attn_resolutions count feature-map sizes, after the unshuffle).
        in_channels, out_channels = in_channels * patch_size**2, out_channels * patch_size**2
        img_resolution //= patch_size
        self.num_classes = num_classes
        self.cond_mode = cond_mode
        self.emb_dim = model_channels * emb_mult

        use_embed = cond_mode != "lora_only" or keep_embedding
        block_emb = self.emb_dim if cond_mode != "lora_only" else 0  # 0: no projection
        # A wide sinusoid resolves EDM's small labels (ln(sigma)/4 in about [-1.6, 1.1]):
        # only frequencies near 1 vary over that range, so width buys resolution.
        noise_channels = noise_channels or self.emb_dim
        self.embed = Embedding(noise_channels, self.emb_dim, num_classes) if use_embed else None

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim=block_emb, dropout=dropout)

        spec = (model_channels, channel_mult, num_blocks, attn_resolutions)
        enc, skips, ch, bottom = encoder_plan(img_resolution, *spec)
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.enc = nn.ModuleList(self._layer(step, res, num_heads) for step in enc)
        # Middle: ResBlock, Attn, ResBlock at the lowest resolution.
        self.mid_res1 = res(ch, ch)
        self.mid_attn = AttnBlock(ch, num_heads)
        self.mid_res2 = res(ch, ch)
        dec = decoder_plan(ch, bottom, skips, *spec)
        self.dec = nn.ModuleList(self._layer(step, res, num_heads) for step in dec)

        self.norm_out = group_norm(model_channels * channel_mult[0])
        self.conv_out = nn.Conv2d(model_channels * channel_mult[0], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the net starts by predicting zero (EDM/ADM)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _layer(step: BlockPlan, res: Callable[[int, int], nn.Module], heads: int) -> nn.ModuleDict:
        """The modules of one planned step: {"down"} or {"res", ["attn"], ["up"]}."""
        if step.resample == "down":
            return nn.ModuleDict({"down": Downsample(step.cin)})
        layer = nn.ModuleDict({"res": res(step.cin, step.cout)})
        if step.attn:
            layer["attn"] = AttnBlock(step.cout, heads)
        if step.resample == "up":
            layer["up"] = Upsample(step.cout)
        return layer

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, Cin, H, W), noise_labels (B,), class_labels None/(B,)/(B, K) -> (B, Cout, H, W)."""
        size = self.patch_size * 2 ** (self.num_levels - 1)
        if x.shape[-1] % size or x.shape[-2] % size:
            raise ValueError(f"input {tuple(x.shape)} not divisible by {size}")
        x = F.pixel_unshuffle(x, self.patch_size) if self.patch_size > 1 else x
        emb = None
        if self.embed is not None:
            emb = self.embed(noise_labels.reshape(-1), class_labels)
            if self.cond_mode == "lora_only":
                emb = None  # computed for hooks on `embed` only; blocks take no embedding

        h = self.conv_in(x)
        skips = [h]
        for layer in self.enc:
            if "down" in layer:
                h = layer["down"](h)
            else:
                h = layer["res"](h, emb)
                if "attn" in layer:
                    h = layer["attn"](h)
            skips.append(h)

        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)

        for layer in self.dec:
            h = layer["res"](torch.cat([h, skips.pop()], dim=1), emb)
            if "attn" in layer:
                h = layer["attn"](h)
            if "up" in layer:
                h = layer["up"](h)

        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.patch_size) if self.patch_size > 1 else out
