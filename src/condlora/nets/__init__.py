"""condlora.nets: U-Nets and vector denoisers (no LoRA code inside)."""

from condlora.nets.adm import ADMUNet
from condlora.nets.ddpmpp import DDPMppUNet
from condlora.nets.unet import SmallUNet, count_parameters

__all__ = ["ADMUNet", "DDPMppUNet", "SmallUNet", "count_parameters"]
