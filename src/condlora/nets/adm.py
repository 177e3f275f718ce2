"""ADMUNet: the improved-DDPM (ADM) U-Net of Nichol & Dhariwal (2021) for 32x32 images.

Module names follow improved-diffusion's `UNetModel` (`time_embed`, `label_emb`,
`input_blocks`, `middle_block`, `output_blocks`, `out`; inside blocks `in_layers`,
`emb_layers`, `out_layers`, `skip_connection`, `qkv`, `proj_out`), so state dicts map
one to one. With the CIFAR-10 settings (`model_channels` 128, 3 blocks, `channel_mult`
(1, 2, 2, 2), attention at 16 and 8, 6 output channels) it has 52,546,438 parameters.

`cond_mode`:
    "scale_shift"  residual blocks apply `norm(h) * (1 + scale) + shift` from the
                   timestep (+ class) embedding (use_scale_shift_norm).
    "lora_only"    no timestep MLP, no label embedding, no `emb_layers`: the condition
                   reaches the net only through LoRA on `qkv` / `proj_out` (TimeLoRA,
                   ClassLoRA), added from outside.
    "both"         as "scale_shift"; LoRA is added from outside too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from condlora.core.labels import class_weights
from condlora.nets.unet import BlockPlan, check_unet_args, decoder_plan, encoder_plan


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in float32 (ADM `normalization`)."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise in float32, return in x's dtype."""
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM sinusoidal timestep embedding (B,) -> (B, dim): cos half, then sin half."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def _zero(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (ADM `zero_module`): the block starts as its skip path."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """ADM residual block; `emb_layers` gives (scale, shift) unless emb_dim is 0."""

    def __init__(self, channels: int, out_channels: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = (
            nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels)) if emb_dim else None
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        same = out_channels == channels
        self.skip_connection = nn.Identity() if same else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        """x (B, C, H, W), emb (B, E) or None -> (B, C_out, H, W)."""
        h = self.in_layers(x)
        norm, rest = self.out_layers[0], self.out_layers[1:]
        h = norm(h)
        if self.emb_layers is not None:
            scale, shift = self.emb_layers(emb).type(h.dtype)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        return self.skip_connection(x) + rest(h)


class AttentionBlock(nn.Module):
    """Self-attention over positions with a 1x1 Conv1d `qkv` and a zero-initialised `proj_out`."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W); emb is ignored."""
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))  # (B, 3C, L), per head [q; k; v] (ADM legacy order)
        heads = qkv.reshape(b * self.num_heads, 3 * c // self.num_heads, -1)
        q, k, v = (t.transpose(1, 2) for t in heads.chunk(3, dim=1))  # (B*heads, L, C/heads)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, -1)
        return (flat + self.proj_out(out)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    """Stride-2 Conv3x3 (`op`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2, then Conv3x3 (`conv`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbedSequential(nn.ModuleList):
    """A list of layers called in turn; residual blocks also get the embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        """Apply every layer; non-block layers ignore emb."""
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock | AttentionBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """forward(x, noise_labels, class_labels=None) -> (B, out_channels, H, W).

    `noise_labels` are timestep indices (floats allowed: respaced or interpolated steps).
    """

    def __init__(
        self,
        img_resolution: int = 32,  # input H = W
        in_channels: int = 3,  # image channels in
        out_channels: int = 6,  # 2 x in_channels with learned variance
        model_channels: int = 128,  # base width
        channel_mult: tuple = (1, 2, 2, 2),  # width multiplier per level
        num_blocks: int = 3,  # residual blocks per level (decoder: num_blocks + 1)
        attn_resolutions: tuple = (16, 8),  # resolutions with attention after each block
        num_heads: int = 4,  # attention heads
        num_classes: int = 0,  # 0: unconditional
        cond_mode: str = "scale_shift",  # "scale_shift" | "lora_only" | "both"
        dropout: float = 0.3,  # residual-block dropout
        timestep_scale: float = 1.0,  # embed t * scale (IDDPM: 1000 / T, rescale_timesteps)
    ) -> None:
        super().__init__()
        levels = len(channel_mult)
        check_unet_args(cond_mode, img_resolution, levels)
        self.model_channels = model_channels
        self.timestep_scale = timestep_scale
        self.num_classes = num_classes
        self.cond_mode = cond_mode
        lora_only = cond_mode == "lora_only"
        emb_dim = 0 if lora_only else 4 * model_channels
        self.time_embed = None
        self.label_emb = None
        if not lora_only:
            self.time_embed = nn.Sequential(
                nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
            )
            self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes else None

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout)

        def layer(step: BlockPlan) -> EmbedSequential:
            if step.resample == "down":
                return EmbedSequential([Downsample(step.cin)])
            layers = [res(step.cin, step.cout)]
            layers += [AttentionBlock(step.cout, num_heads)] if step.attn else []
            layers += [Upsample(step.cout)] if step.resample == "up" else []
            return EmbedSequential(layers)

        spec = (model_channels, channel_mult, num_blocks, attn_resolutions)
        enc, skips, ch, bottom = encoder_plan(img_resolution, *spec)
        stem = EmbedSequential([nn.Conv2d(in_channels, model_channels, 3, padding=1)])
        self.input_blocks = nn.ModuleList([stem, *(layer(step) for step in enc)])
        self.middle_block = EmbedSequential(
            [res(ch, ch), AttentionBlock(ch, num_heads), res(ch, ch)]
        )
        dec = decoder_plan(ch, bottom, skips, *spec)
        self.output_blocks = nn.ModuleList(layer(step) for step in dec)
        ch = dec[-1].cout
        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), _zero(nn.Conv2d(ch, out_channels, 3, padding=1))
        )

    def embedding(
        self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None
    ) -> torch.Tensor | None:
        """(B, 4 * model_channels) timestep (+ class) embedding; None in lora_only mode."""
        if self.time_embed is None:
            return None
        t = noise_labels.reshape(-1) * self.timestep_scale
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if self.label_emb is not None and class_labels is not None:
            weights = class_weights(class_labels, self.num_classes)  # a mixture of label rows
            emb = emb + weights.to(emb.dtype) @ self.label_emb.weight
        return emb

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, Cin, H, W), timesteps (B,), class labels None/(B,)/(B, K) -> (B, Cout, H, W)."""
        emb = self.embedding(noise_labels, class_labels)
        h, hs = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
