"""diffusers' layout (pytorch_lora_weights.safetensors), as dict-to-dict functions.

Key table (module = dotted path in the U-Net):
    unet.<module>.lora_A.weight   A      (no `unet.` prefix in files from save_lora_adapter)
    unet.<module>.lora_B.weight   B
    unet.<module>.alpha           alpha  (optional; scale alpha / r)
    text_encoder.* / text_encoder_2.*    kept apart, not converted
Scale: an `.alpha` entry if present, else the LoraConfig stored as JSON under the file
metadata key `lora_adapter_metadata` (keys `unet.r`, `unet.lora_alpha` ...), else 1 (diffusers'
convention when a file carries neither).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from torch import Tensor

from condlora.core.errors import LoRAError
from condlora.lora.formats.peft import check_config, check_writable, config_scales, lora_config
from condlora.lora.formats.weights import (
    LoRAWeights,
    alpha_value,
    factor_ranks,
    group_by_module,
    make_module,
)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
UNET_PREFIX = "unet."
TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.")
KEYS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".alpha": "alpha"}
METADATA_KEY = "lora_adapter_metadata"


def adapter_config(metadata: Mapping[str, str], where: str) -> dict | None:
    """The U-Net's LoraConfig dict from the file metadata, or None if the file has none."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoRAError(f"{where}: metadata {METADATA_KEY!r} is not JSON ({err})") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{where}: metadata {METADATA_KEY!r} is not a JSON object")
    if any(k.startswith(UNET_PREFIX) for k in config):
        config = {k[len(UNET_PREFIX) :]: v for k, v in config.items() if k.startswith(UNET_PREFIX)}
    return config or None


def from_diffusers(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str], where: str
) -> LoRAWeights:
    """diffusers LoRA state dict + file metadata -> LoRAWeights."""
    text = {k: v for k, v in tensors.items() if k.startswith(TEXT_PREFIXES)}
    unet = {k: v for k, v in tensors.items() if k not in text}
    prefix = UNET_PREFIX if any(k.startswith(UNET_PREFIX) for k in unet) else ""
    groups = group_by_module(unet, prefix, KEYS, where)
    ranks = factor_ranks(groups, where)
    config = adapter_config(metadata, where)
    if config is not None:
        check_config(config, where)
        scales = config_scales(config, ranks, where)
    else:
        scales = dict.fromkeys(ranks, 1.0)
    for module, parts in groups.items():
        if "alpha" in parts:
            scales[module] = alpha_value(parts["alpha"], module, where) / ranks[module]
    modules = {
        module: make_module(module, parts["A"], parts["B"], scales[module], where)
        for module, parts in sorted(groups.items())
    }
    return LoRAWeights(modules, "diffusers", text_encoder=text)


def to_diffusers(weights: LoRAWeights) -> tuple[dict[str, Tensor], dict[str, str]]:
    """LoRAWeights -> (diffusers state dict, file metadata carrying r and alpha per module)."""
    check_writable(weights, "diffusers")
    tensors = {}
    for name, m in weights.modules.items():
        tensors[f"{UNET_PREFIX}{name}.lora_A.weight"] = m.A
        tensors[f"{UNET_PREFIX}{name}.lora_B.weight"] = m.B
    config = {f"{UNET_PREFIX}{k}": v for k, v in lora_config(weights).items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    return tensors, metadata
