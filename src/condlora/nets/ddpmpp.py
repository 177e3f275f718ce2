"""DDPMppUNet: the DDPM++ U-Net as EDM (Karras et al. 2022) configures it for CIFAR-10.

Module names follow EDM's `SongUNet` (`map_noise`, `map_label`, `map_augment`,
`map_layer0/1`, `enc.32x32_conv`, `enc.16x16_block0`, ..., `dec.32x32_aux_conv`; inside
blocks `norm0`, `conv0`, `affine`, `norm1`, `conv1`, `skip`, `norm2`, `qkv`, `proj`).
With `model_channels` 128, `channel_mult` (2, 2, 2), 4 blocks, attention at 16, a
128-d positional noise embedding and a 9-d augmentation label it has 55,733,891
parameters (55,735,299 with 10 classes).

`cond_mode`:
    "scale_shift"  every block adds `affine(emb)` after its first conv (DDPM++'s
                   shift-only conditioning).
    "lora_only"    no `affine` layers; the mapping network still runs and its output
                   (`map_act`, the 512-d embedding) feeds UC-LoRA through a hook.
    "both"         as "scale_shift"; LoRA is added from outside too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from condlora.core.labels import class_weights
from condlora.nets.unet import check_unet_args


def edm_group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(32, channels // 4) groups and eps 1e-6 (EDM)."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-6)


def positional_embedding(
    labels: torch.Tensor, dim: int, max_positions: float = 1e4
) -> torch.Tensor:
    """(B,) -> (B, dim): sin half then cos half, frequencies 1 .. 1/max_positions inclusive."""
    half = dim // 2
    freqs = (1 / max_positions) ** (
        torch.arange(half, dtype=torch.float32, device=labels.device) / (half - 1)
    )
    angles = labels.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # EDM's swapped order


def _init(layer: nn.Module, gain: float = 1.0) -> nn.Module:
    """Xavier-uniform weight scaled by gain, zero bias (EDM's init for DDPM++)."""
    nn.init.xavier_uniform_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _conv(cin: int, cout: int, kernel: int, gain: float = 1.0) -> nn.Conv2d:
    return _init(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), gain)


def resample(x: torch.Tensor, up: bool, down: bool) -> torch.Tensor:
    """The [1, 1] resampling filter: nearest x2 up, or 2x2 average-pool down."""
    if up:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if down:
        return F.avg_pool2d(x, 2)
    return x


class UNetBlock(nn.Module):
    """DDPM++ block: norm-SiLU-conv, + affine(emb), norm-SiLU-dropout-conv, skip, [attention]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,  # 0: no affine layer (lora_only)
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down = up, down
        self.norm0 = edm_group_norm(in_channels)
        self.conv0 = _conv(in_channels, out_channels, 3)
        self.affine = _init(nn.Linear(emb_channels, out_channels)) if emb_channels else None
        self.norm1 = edm_group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _conv(out_channels, out_channels, 3, gain=1e-5)
        self.skip = None
        if in_channels != out_channels or up or down:  # EDM resample_proj: always a 1x1 conv
            self.skip = _conv(in_channels, out_channels, 1)
        self.attention = attention
        if attention:  # one head (DDPM++); qkv and proj are the LoRA targets
            self.norm2 = edm_group_norm(out_channels)
            self.qkv = _conv(out_channels, 3 * out_channels, 1, gain=math.sqrt(0.2))
            self.proj = _conv(out_channels, out_channels, 1, gain=1e-5)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, H, W), emb (B, E) -> (B, Cout, H', W')."""
        orig = x
        x = self.conv0(resample(F.silu(self.norm0(x)), self.up, self.down))
        if self.affine is not None:
            x = x + self.affine(emb)[:, :, None, None].to(x.dtype)
        x = self.conv1(self.dropout(F.silu(self.norm1(x))))
        skip = orig if self.skip is None else self.skip(resample(orig, self.up, self.down))
        x = (x + skip) * math.sqrt(0.5)
        if self.attention:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b, c, 3, h * w).unbind(2)
            a = F.scaled_dot_product_attention(
                q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None], v.transpose(1, 2)[:, None]
            )  # (B, 1, HW, C)
            x = (self.proj(a[:, 0].transpose(1, 2).reshape(b, c, h, w)) + x) * math.sqrt(0.5)
        return x


Block = Callable[..., nn.Module]


def _encoder(
    block: Block,
    in_channels: int,
    img_resolution: int,
    model_channels: int,
    channel_mult: tuple,
    num_blocks: int,
    attn_resolutions: tuple,
) -> tuple[nn.ModuleDict, list[int], int]:
    """SongUNet's encoder: per level a conv (first) or a down block, then num_blocks blocks.

    Returns (modules by EDM's names, skip channels, channels at the bottom).
    """
    enc, cout = nn.ModuleDict(), in_channels
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level == 0:
            enc[f"{res}x{res}_conv"] = _conv(cout, model_channels, 3)
            cout = model_channels
        else:
            enc[f"{res}x{res}_down"] = block(cout, cout, down=True)
        for idx in range(num_blocks):
            cin, cout = cout, model_channels * mult
            enc[f"{res}x{res}_block{idx}"] = block(cin, cout, attention=res in attn_resolutions)
    skips = [b.out_channels if isinstance(b, UNetBlock) else model_channels for b in enc.values()]
    return enc, skips, cout


def _decoder(
    block: Block,
    cout: int,
    skips: list[int],
    img_resolution: int,
    model_channels: int,
    channel_mult: tuple,
    num_blocks: int,
    attn_resolutions: tuple,
) -> nn.ModuleDict:
    """SongUNet's decoder: two blocks (the first with attention) at the bottom or an up block,
    then num_blocks + 1 blocks on concatenated skips (attention after the last)."""
    dec, skips = nn.ModuleDict(), list(skips)
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = img_resolution >> level
        if level == len(channel_mult) - 1:
            dec[f"{res}x{res}_in0"] = block(cout, cout, attention=True)
            dec[f"{res}x{res}_in1"] = block(cout, cout)
        else:
            dec[f"{res}x{res}_up"] = block(cout, cout, up=True)
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            attn = idx == num_blocks and res in attn_resolutions
            dec[f"{res}x{res}_block{idx}"] = block(cin, cout, attention=attn)
    return dec


class DDPMppUNet(nn.Module):
    """forward(x, noise_labels, class_labels=None, augment_labels=None) -> (B, Cout, H, W)."""

    def __init__(
        self,
        img_resolution: int = 32,  # input H = W
        in_channels: int = 3,
        out_channels: int = 3,
        model_channels: int = 128,  # base width
        channel_mult: tuple = (2, 2, 2),  # width multiplier per level
        num_blocks: int = 4,  # blocks per level (decoder: num_blocks + 1)
        attn_resolutions: tuple = (16,),
        num_classes: int = 0,  # 0: unconditional
        augment_dim: int = 9,  # augmentation-label width (0: none)
        cond_mode: str = "scale_shift",  # "scale_shift" | "lora_only" | "both"
        dropout: float = 0.13,
        noise_channels: int | None = None,  # positional-embedding width (None: model_channels)
        emb_mult: int = 4,  # embedding width = model_channels * emb_mult
    ) -> None:
        super().__init__()
        levels = len(channel_mult)
        check_unet_args(cond_mode, img_resolution, levels)
        self.num_classes = num_classes
        self.cond_mode = cond_mode
        self.noise_channels = noise_channels or model_channels
        emb = model_channels * emb_mult
        self.emb_dim = emb
        self.map_label = _init(nn.Linear(num_classes, self.noise_channels)) if num_classes else None
        self.map_augment = (
            _init(nn.Linear(augment_dim, self.noise_channels, bias=False)) if augment_dim else None
        )
        self.map_layer0 = _init(nn.Linear(self.noise_channels, emb))
        self.map_layer1 = _init(nn.Linear(emb, emb))
        self.map_act = nn.SiLU()  # its output is the embedding (UC-LoRA's hook point)
        block_emb = 0 if cond_mode == "lora_only" else emb

        def block(cin: int, cout: int, **kw: bool) -> UNetBlock:
            return UNetBlock(cin, cout, block_emb, dropout=dropout, **kw)

        spec = (img_resolution, model_channels, channel_mult, num_blocks, attn_resolutions)
        self.enc, skips, cout = _encoder(block, in_channels, *spec)
        self.dec = _decoder(block, cout, skips, *spec)
        self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = edm_group_norm(
            model_channels * channel_mult[0]
        )
        self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = _conv(
            model_channels * channel_mult[0], out_channels, 3, 1e-5
        )

    def embedding(
        self,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, emb_dim) embedding of the noise level, class and augmentation labels."""
        emb = positional_embedding(noise_labels.reshape(-1), self.noise_channels)
        if self.map_label is not None:
            # no labels: a zero row, as EDM's EDMPrecond passes; map_label's bias still counts
            if class_labels is None:
                weights = emb.new_zeros(1, self.num_classes)
            else:
                weights = class_weights(class_labels, self.num_classes).to(emb.dtype)
            emb = emb + self.map_label(weights * math.sqrt(self.num_classes))  # EDM's scaling
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        return self.map_act(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, Cin, H, W), noise labels (B,) -> (B, Cout, H, W)."""
        emb = self.embedding(noise_labels, class_labels, augment_labels)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        out = None
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):
                out = block(x)
            elif name.endswith("aux_conv"):
                out = block(F.silu(out))
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out
