"""condlora.nets: U-Nets and vector denoisers (no LoRA code inside)."""

from condlora.nets.unet import SmallUNet, count_parameters

__all__ = ["SmallUNet", "count_parameters"]
