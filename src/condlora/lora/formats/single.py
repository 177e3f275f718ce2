"""Single-file LoRAs (diffusers old and new, kohya SD 1.x / SDXL, ComfyUI) -> LoRAWeights.

Every key is parsed (keys.py), grouped by module, and its module name mapped to the base
model's path (keys.py); keys that are no LoRA factor or alpha are kept by name with the
reason in `LoRAWeights.unmapped`. Scale per module: its `.alpha` / r if the file has one, else
the LoraConfig in the file metadata (diffusers), else 1 (kohya: alpha = r; diffusers: the same).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from condlora.core.errors import LoRAError
from condlora.lora.formats.diffusers import adapter_config
from condlora.lora.formats.keys import (
    TEXT,
    UNET,
    ParsedKey,
    clip_path,
    is_text_module,
    key_layout,
    ldm_table,
    looks_ldm,
    parse_key,
)
from condlora.lora.formats.kinds import ModuleDelta, check_parts, kind_of
from condlora.lora.formats.kohya import header_hints, kohya_stem, resolve, stem_table
from condlora.lora.formats.peft import check_config, config_scales
from condlora.lora.formats.weights import (
    BaseModules,
    LoRAWeights,
    alpha_value,
    factor_ranks,
    make_module,
)

Group = dict[str, Tensor]


class Names:
    """Maps parsed module names to the base model's paths (via kohya stems and LDM paths)."""

    def __init__(self, base: BaseModules | None, where: str) -> None:
        self.base, self.where = base, where
        self.stems = stem_table(base) if base is not None else None
        self.from_ldm = {v: k for k, v in ldm_table(base).items()} if base is not None else {}

    def unet(self, naming: str, module: str) -> tuple[str, bool]:
        """A U-Net module's (dotted path, True), or (kohya stem, False) without a base list."""
        if self.stems is None:
            if naming == "stem" or looks_ldm(module):
                return kohya_stem(module), False
            return module, True
        if naming == "stem":
            return resolve(module, self.stems, self.where), True
        if module not in self.base and module in self.from_ldm:
            return self.from_ldm[module], True
        return module, True  # not in the base model: check_base says so

    def text(self, naming: str, module: str) -> str | None:
        """A text-encoder module's dotted path (CLIP's text_model.<...> as files name it), or
        None if a stem is not a CLIP layer."""
        if naming == "stem":
            return clip_path(module)
        # transformers 5 dropped the text_model level, and files saved from it lack it too
        return "text_model." + module if module.startswith("encoder.layers.") else module


def group_keys(
    tensors: Mapping[str, Tensor], where: str
) -> tuple[dict[tuple[str, str, str], Group], dict[str, str], dict[tuple, list[str]]]:
    """(groups by (component, naming, module), unmapped key -> reason, group -> its keys);
    LoRAError if a group mixes the parts of different kinds or lacks a LoRA factor."""
    groups: dict[tuple[str, str, str], Group] = {}
    keys: dict[tuple, list[str]] = {}
    unmapped = {}
    for key, value in tensors.items():
        parsed = parse_key(key)
        if not isinstance(parsed, ParsedKey):
            unmapped[key] = parsed
            continue
        slot = (parsed.component, parsed.naming, parsed.module)
        group = groups.setdefault(slot, {})
        if parsed.role in group:
            raise LoRAError(f"{where}: two keys hold the {parsed.role} of module {parsed.module}")
        group[parsed.role] = value
        keys.setdefault(slot, []).append(key)
    for slot, group in groups.items():
        kind = kind_of(set(group))
        if kind == "mixed":
            roles = sorted(group)
            raise LoRAError(f"{where}: module {slot[2]} mixes parts {roles} of different kinds")
        for role in ("A", "B") if kind == "lora" else ():
            if role not in group:
                raise LoRAError(f"{where}: module {slot[2]} has no {role} factor ({keys[slot][0]})")
    return groups, unmapped, keys


def _scales(groups: Mapping, ranks: Mapping, metadata: Mapping[str, str], where: str) -> dict:
    """Each group's scale: alpha / r, else the component's LoraConfig in the metadata, else 1."""
    scales = {}
    for component in {slot[0] for slot in groups}:
        slots = [s for s in groups if s[0] == component]
        config = adapter_config(metadata, where, component)
        if config is not None:
            check_config(config, where)
            by_name = config_scales(config, {s[2]: ranks[s] for s in slots}, where)
            scales.update({s: by_name[s[2]] for s in slots})
    for slot, group in groups.items():
        if "alpha" in group:
            scales[slot] = alpha_value(group["alpha"], slot[2], where) / ranks[slot]
    return {slot: scales.get(slot, 1.0) for slot in groups}


def from_single_file(
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    base: BaseModules | None,
    where: str,
    layout: str | None = None,
) -> LoRAWeights:
    """A single-file LoRA's tensors + metadata -> LoRAWeights (U-Net names via `base`)."""
    layout = layout or key_layout(list(tensors)) or "diffusers"
    groups, unmapped, keys = group_keys(tensors, where)
    lora = {slot: g for slot, g in groups.items() if kind_of(set(g)) == "lora"}
    pairs = {slot: g for slot, g in groups.items() if kind_of(set(g)) in ("lora", "dora")}
    ranks = {slot: factor_ranks({slot[2]: g}, where)[slot[2]] for slot, g in pairs.items()}
    scales = _scales(pairs, ranks, metadata, where)  # peft's DoRA: the pair's scale too
    names = Names(base, where)
    modules, text, others, resolved = {}, {}, {}, True
    for slot, group in sorted(groups.items()):
        component, naming, module = slot
        if component == UNET and naming == "stem" and clip_path(module):
            component = TEXT  # lycoris_<CLIP layer>: lycoris' own file of a text encoder
        if component == UNET:
            name, ok = names.unet(naming, module)
            resolved &= ok
            target = modules
        else:
            path = names.text(naming, module)
            if path is None:
                reason = f"{component} module {module} is not a CLIP layer: cannot map it"
                unmapped.update(dict.fromkeys(keys[slot], reason))
                continue
            name, target = f"{component}.{path}", text
        if name in target or name in others:
            raise LoRAError(f"{where}: two sets of keys give the update of module {name}")
        if slot in lora:
            target[name] = make_module(name, group["A"], group["B"], scales[slot], where)
        elif slot in pairs:
            alpha = torch.tensor(scales[slot] * ranks[slot], dtype=torch.float64)
            others[name] = other_module(name, {**group, "alpha": alpha}, base, where)
        else:
            others[name] = other_module(name, group, base, where)
    hints = header_hints(metadata)
    return LoRAWeights(modules, layout, text, resolved, hints, unmapped, others)


def other_module(name: str, parts: Group, base: BaseModules | None, where: str) -> ModuleDelta:
    """A LoHa / LoKr / full / Tucker / DoRA module, checked; its shape from the base model."""
    kind = kind_of(set(parts))
    check_parts(kind, parts, name, where)
    shape = base.get(name) if base is not None else None
    module = ModuleDelta(kind, dict(parts), tuple(shape) if shape is not None else None)
    if module.ambiguous_shape and is_text_module(name):  # CLIP layers are Linear: dW as stored
        module = ModuleDelta(kind, module.parts, module.delta_shape)
    return module


def from_diffusers(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str], where: str
) -> LoRAWeights:
    """A diffusers-layout state dict (new or old keys) + file metadata -> LoRAWeights."""
    return from_single_file(tensors, metadata, None, where, "diffusers")


def from_kohya(
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    base: BaseModules | Iterable[str] | None,
    where: str,
) -> LoRAWeights:
    """A kohya state dict -> LoRAWeights; without `base` U-Net names stay kohya stems."""
    base = dict.fromkeys(base) if base is not None and not isinstance(base, Mapping) else base
    return from_single_file(tensors, metadata, base, where, "kohya")
