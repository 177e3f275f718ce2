"""condlora.lora: conditional LoRA layers injected from outside any model.

    y = W x + b + s * ( B ((w(c) ⊗ 1_r) ⊙ (A x)) + w(c) E ),   w(c) from a composer

Typical use::

    names = inject(unet, LoRAConfig(method="time", num_bases=11, targets=["to_q", "to_v"]))
    with conditioning(unet, t=t):
        out = unet(x, timesteps)

Inside a diffusers pipeline: `condlora.lora.diffusers_callback.ConditionalLoRA` (its
callback_on_step_end sets each step's condition, `set_condition`).
"""

from condlora.lora.composers import (
    ClassComposer,
    ConcatComposer,
    TimeComposer,
    UCComposer,
    build_composer,
    hat_table,
)
from condlora.lora.config import METHODS, LoRAConfig
from condlora.lora.inject import (
    count_lora_parameters,
    inject,
    lora_parameters,
    lora_state_dict,
    remove,
)
from condlora.lora.io import CONFIG_KEY, load_lora, read_lora_config, save_lora
from condlora.lora.layer import CondLoRALayer
from condlora.lora.runtime import (
    conditioning,
    lora_layers,
    merge,
    merged,
    set_condition,
    unmerge,
)

__all__ = [
    "CONFIG_KEY",
    "METHODS",
    "ClassComposer",
    "ConcatComposer",
    "CondLoRALayer",
    "LoRAConfig",
    "TimeComposer",
    "UCComposer",
    "build_composer",
    "conditioning",
    "count_lora_parameters",
    "hat_table",
    "inject",
    "load_lora",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "merge",
    "merged",
    "read_lora_config",
    "remove",
    "save_lora",
    "set_condition",
    "unmerge",
]
