"""diffusers' layout (pytorch_lora_weights.safetensors), as dict-to-dict functions.

Key table (module = dotted path in the U-Net):
    unet.<module>.lora_A.weight   A      (no `unet.` prefix in files from save_lora_adapter)
    unet.<module>.lora_B.weight   B
    unet.<module>.alpha           alpha  (optional; scale alpha / r)
    text_encoder.<module>.lora_A.weight ...  text encoders (read and written; older key forms
                                             are read too, see keys.py)
Scale: an `.alpha` entry if present, else the LoraConfig stored as JSON under the file
metadata key `lora_adapter_metadata` (keys `unet.r`, `unet.lora_alpha` ...), else 1 (diffusers'
convention when a file carries neither).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from torch import Tensor

from condlora.core.errors import LoRAError
from condlora.lora.formats.keys import COMPONENTS, UNET
from condlora.lora.formats.peft import check_writable, lora_config, split_dora
from condlora.lora.formats.weights import LoRAWeights

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
UNET_PREFIX = "unet."
METADATA_KEY = "lora_adapter_metadata"


def adapter_config(metadata: Mapping[str, str], where: str, component: str = "unet") -> dict | None:
    """A component's LoraConfig dict from the file metadata, or None if the file has none.

    Keys prefixed `unet.` / `text_encoder.` ... belong to that component; unprefixed keys
    (save_lora_adapter) are the U-Net's."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoRAError(f"{where}: metadata {METADATA_KEY!r} is not JSON ({err})") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{where}: metadata {METADATA_KEY!r} is not a JSON object")
    prefixed = [k for k in config if k.startswith(tuple(f"{c}." for c in COMPONENTS))]
    if prefixed or component != UNET:
        start = f"{component}."
        config = {k[len(start) :]: v for k, v in config.items() if k.startswith(start)}
    return config or None


def to_diffusers(weights: LoRAWeights) -> tuple[dict[str, Tensor], dict[str, str]]:
    """LoRAWeights -> (diffusers state dict, file metadata carrying r and alpha per module);
    a peft DoRA adapter keeps its magnitude vectors (diffusers loads them as DoRA)."""
    weights, magnitudes = split_dora(weights)
    check_writable(weights, "diffusers")
    tensors = {}
    for name, m in weights.modules.items():
        tensors[f"{UNET_PREFIX}{name}.lora_A.weight"] = m.A
        tensors[f"{UNET_PREFIX}{name}.lora_B.weight"] = m.B
        if name in magnitudes:
            tensors[f"{UNET_PREFIX}{name}.lora_magnitude_vector"] = magnitudes[name]
    # text encoders: the scale goes into B (no metadata for them means scale 1 in diffusers)
    for name, m in weights.text_encoder.items():
        folded = m.folded()
        tensors[f"{name}.lora_A.weight"] = folded.A
        tensors[f"{name}.lora_B.weight"] = folded.B
    config = lora_config(weights) | {"use_dora": bool(magnitudes)} if weights.modules else {}
    config = {f"{UNET_PREFIX}{k}": v for k, v in config.items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    return tensors, metadata
