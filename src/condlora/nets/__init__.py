"""condlora.nets: U-Nets and vector denoisers (no LoRA code inside)."""

from condlora.nets.adm import ADMUNet
from condlora.nets.ddpmpp import DDPMppUNet
from condlora.nets.unet import SmallUNet
from condlora.nets.vector import (
    AdaLoRA,
    AdaNorm,
    ResMLP,
    ResMLPBlock,
    VectorDenoiser,
    VectorNetConfig,
)

__all__ = [
    "ADMUNet",
    "AdaLoRA",
    "AdaNorm",
    "DDPMppUNet",
    "ResMLP",
    "ResMLPBlock",
    "SmallUNet",
    "VectorDenoiser",
    "VectorNetConfig",
]
