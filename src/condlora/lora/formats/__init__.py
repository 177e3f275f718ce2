"""LoRA files in the layouts people hold (peft, diffusers, kohya), one in-memory form.

weights = read_lora("my_lora/")                # peft folder, diffusers, kohya or ComfyUI file
write_lora(weights, "out.safetensors", "kohya")  # alpha kept: same dW in every layout

Older diffusers keys, LDM module names and text encoders are read too (keys.py,
single.py); LyCORIS kinds and DoRA with read_lora(..., other_kinds=True) (kinds.py); exact-dW
SVD for resizing, merging and writing other kinds as plain LoRA in svd.py.
"""

from condlora.lora.formats.files import (
    LAYOUTS,
    base_modules_of,
    detect_layout,
    load_base_modules,
    read_lora,
    write_lora,
    write_loras,
)
from condlora.lora.formats.weights import (
    BaseMismatch,
    BaseModules,
    LoRAWeights,
    ModuleLoRA,
    make_module,
)

__all__ = [
    "LAYOUTS",
    "BaseMismatch",
    "BaseModules",
    "LoRAWeights",
    "ModuleLoRA",
    "base_modules_of",
    "detect_layout",
    "load_base_modules",
    "make_module",
    "read_lora",
    "write_lora",
    "write_loras",
]
