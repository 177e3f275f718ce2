"""kohya sd-scripts' layout, as dict-to-dict functions.

Key table (stem = `lora_unet_` + the module's dotted path with every `.` written as `_`):
    <stem>.lora_down.weight   A [r, in] or [r, in, k, k]
    <stem>.lora_up.weight     B [out, r] or [out, r, 1, 1]
    <stem>.alpha              alpha, a scalar (absent: alpha = r); scale alpha / r
    lora_te_* / lora_te1_* / lora_te2_*   text encoders: kept apart, not converted
A stem cannot be turned back into a dotted path by guessing (module names hold underscores
themselves), so names are mapped through the base model's module list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from condlora.core.errors import LoRAError
from condlora.lora.formats.weights import (
    BaseMismatch,
    LoRAWeights,
    alpha_value,
    clean_number,
    factor_ranks,
    group_by_module,
    make_module,
)

UNET_PREFIX = "lora_unet_"
TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
KEYS = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}
HINT_KEYS = ("ss_sd_model_name", "ss_base_model_version", "modelspec.architecture", "ss_v2")


def kohya_stem(module: str) -> str:
    """The kohya name of a dotted module path (without the lora_unet_ prefix)."""
    return module.replace(".", "_")


def stem_table(base_modules: Iterable[str]) -> dict[str, list[str]]:
    """kohya stem -> the base model's module paths that it could name."""
    table: dict[str, list[str]] = {}
    for name in base_modules:
        table.setdefault(kohya_stem(name), []).append(name)
    return table


def resolve(stem: str, table: Mapping[str, list[str]], where: str) -> str:
    """The one dotted path of the base model that a kohya stem names; LoRAError otherwise."""
    names = table.get(stem, [])
    if len(names) != 1:
        problem = "is not in" if not names else f"is ambiguous ({', '.join(names)}) in"
        raise BaseMismatch(
            f"{where}: module {UNET_PREFIX}{stem} {problem} the base model's modules"
        )
    return names[0]


def from_kohya(
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    base_modules: Iterable[str] | None,
    where: str,
) -> LoRAWeights:
    """kohya state dict -> LoRAWeights; without base_modules the names stay kohya stems."""
    text = {k: v for k, v in tensors.items() if k.startswith(TEXT_PREFIXES)}
    unet = {k: v for k, v in tensors.items() if k not in text}
    groups = group_by_module(unet, UNET_PREFIX, KEYS, where)
    table = stem_table(base_modules) if base_modules is not None else None
    modules = {}
    ranks = factor_ranks(groups, where)
    for stem, parts in sorted(groups.items()):
        name = resolve(stem, table, where) if table is not None else stem
        rank = ranks[stem]
        alpha = alpha_value(parts["alpha"], stem, where) if "alpha" in parts else rank
        modules[name] = make_module(name, parts["A"], parts["B"], alpha / rank, where)
    hints = {k: metadata[k] for k in HINT_KEYS if metadata.get(k)}
    return LoRAWeights(modules, "kohya", text, resolved=table is not None, hints=hints)


def to_kohya(weights: LoRAWeights) -> tuple[dict[str, Tensor], dict[str, str]]:
    """LoRAWeights -> (kohya state dict with an alpha per module, file metadata)."""
    if not weights.modules:
        raise LoRAError("the LoRA has no U-Net modules to write as kohya")
    tensors: dict[str, Tensor] = {}
    for name, m in weights.modules.items():
        stem = UNET_PREFIX + kohya_stem(name)
        if f"{stem}.alpha" in tensors:
            raise LoRAError(f"two modules share the kohya name {stem}; cannot write as kohya")
        tensors[f"{stem}.lora_down.weight"] = m.A
        tensors[f"{stem}.lora_up.weight"] = m.B
        # alpha = scale * r, so that kohya's alpha / r gives the scale back (never alpha = r)
        tensors[f"{stem}.alpha"] = torch.tensor(clean_number(m.scale * m.rank), dtype=torch.float32)
    return tensors, {"format": "pt"}
