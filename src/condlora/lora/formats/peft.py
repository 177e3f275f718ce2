"""peft's layout: adapter_model.safetensors + adapter_config.json, as dict-to-dict functions.

Key table (module = dotted path in the base model):
    base_model.model.<module>.lora_A.weight   A [r, in] or [r, in, k, k]
    base_model.model.<module>.lora_B.weight   B [out, r] or [out, r, 1, 1]
Scale per module: alpha / r, or alpha / sqrt(r) with use_rslora, where r and alpha come from
rank_pattern / alpha_pattern when a pattern matches the module (peft's own matching rule).

A peft folder holds one model's adapter. A LoRA with text-encoder parts is a folder per
component, as peft's DreamBooth example saves and loads it (PeftModel.from_pretrained on
each model): <folder>/unet/, <folder>/text_encoder/, <folder>/text_encoder_2/, each with
its adapter_model.safetensors and adapter_config.json; text-encoder modules are named by
their path in the CLIP text model.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
from collections import Counter
from collections.abc import Mapping

import torch
from torch import Tensor

from condlora.core.errors import LoRAError
from condlora.lora.formats.keys import TEXT, TEXT_2, UNET, is_text_module
from condlora.lora.formats.kinds import ModuleDelta, check_parts
from condlora.lora.formats.weights import (
    LoRAWeights,
    ModuleLoRA,
    clean_number,
    config_number,
    factor_ranks,
    group_by_module,
    make_module,
)

PREFIX = "base_model.model."
KEYS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "magnitude"}
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}  # LoraConfig's defaults when a key is absent


def pattern_key(patterns: Mapping[str, object], module: str, where: str) -> str | None:
    """The first pattern that matches the module as peft matches it (a suffix regex), or None."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error as err:
            raise LoRAError(f"{where}: bad pattern {key!r} in the config: {err}") from None
    return None


def config_scales(config: Mapping, ranks: Mapping[str, int], where: str) -> dict[str, float]:
    """Each module's scale from a LoraConfig dict; its r must be the rank found in the file."""
    r = config_number(config.get("r", PEFT_DEFAULTS["r"]), "r", where, positive_int=True)
    alpha = config_number(
        config.get("lora_alpha", PEFT_DEFAULTS["lora_alpha"]), "lora_alpha", where
    )
    rank_pattern = _pattern(config, "rank_pattern", where)
    alpha_pattern = _pattern(config, "alpha_pattern", where)
    scales = {}
    for module, rank in ranks.items():
        key = pattern_key(rank_pattern, module, where)
        module_r = r
        if key is not None:
            module_r = config_number(rank_pattern[key], f"rank_pattern[{key!r}]", where, True)
        key = pattern_key(alpha_pattern, module, where)
        module_alpha = alpha
        if key is not None:
            module_alpha = config_number(alpha_pattern[key], f"alpha_pattern[{key!r}]", where)
        if module_r != rank:
            raise LoRAError(
                f"{where}: the config gives module {module} rank {module_r} "
                f"but its factors have rank {rank}"
            )
        denominator = math.sqrt(module_r) if config.get("use_rslora") else module_r
        scales[module] = float(module_alpha) / denominator
    return scales


def _pattern(config: Mapping, key: str, where: str) -> Mapping:
    """rank_pattern / alpha_pattern: a mapping of module patterns (absent or null: empty)."""
    value = config.get(key) or {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise LoRAError(f"{where}: config {key} must map module patterns to numbers, got {value!r}")
    return value


# init_lora_weights values whose adapters were made together with a changed base weight
# (W - s B A for PiSSA / OLoRA / CorDA, a quantised W for LoftQ): not a plain LoRA on W
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def check_config(config: Mapping, where: str) -> None:
    """LoRAError for configs that are not plain LoRA (another peft method, DoRA, an adapter
    that came with a changed base weight)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{where}: peft_type {config['peft_type']!r} is not LORA")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise LoRAError(
            f"{where}: init_lora_weights {init!r} changes the base weights: the adapter is "
            "not a plain LoRA on the original model (convert it with peft first)"
        )
    if config.get("loftq_config"):
        raise LoRAError(
            f"{where}: loftq_config is set: LoftQ adapters go with a quantised base weight, "
            "not a plain LoRA on the original model"
        )


CLIP_LAYER = re.compile(r"^(text_model\.)?encoder\.layers\.\d+\.")  # a CLIP text layer


def clip_name(path: str) -> str:
    """A CLIP text layer's path under CLIPTextModel (text_model.encoder.layers...)."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def from_peft(
    tensors: Mapping[str, Tensor], config: Mapping, where: str, component: str | None = None
) -> LoRAWeights:
    """peft state dict + adapter config -> LoRAWeights (DoRA modules, use_dora, go to
    `others` with their magnitude vectors); `component` text_encoder / text_encoder_2 for
    the adapter of a text encoder (every module is then that encoder's)."""
    check_config(config, where)
    unmapped: dict[str, str] = {}
    groups = group_by_module(tensors, PREFIX, KEYS, where, unmapped)
    ranks = factor_ranks(groups, where)
    scales = config_scales(config, ranks, where)
    modules, others = {}, {}
    for module, parts in sorted(groups.items()):
        lora = make_module(module, parts["A"], parts["B"], scales[module], where)
        if "magnitude" not in parts:
            modules[module] = lora
            continue
        alpha = torch.tensor(scales[module] * ranks[module], dtype=torch.float64)
        dora = {"A": lora.A, "B": lora.B, "magnitude": parts["magnitude"], "alpha": alpha}
        check_parts("dora", dora, module, where)
        others[module] = ModuleDelta("dora", dora)
    hints = {k: str(config[k]) for k in ("base_model_name_or_path", "use_rslora") if config.get(k)}
    # an adapter of a CLIP text model (its layers under [text_model.]encoder.layers.) is a
    # text encoder's, named by its CLIPTextModel path as the other layouts' text parts are
    is_text = (lambda n: True) if component in (TEXT, TEXT_2) else CLIP_LAYER.match  # noqa: E731
    prefix = component if component in (TEXT, TEXT_2) else TEXT
    text_name = lambda n: f"{prefix}.{clip_name(n) if CLIP_LAYER.match(n) else n}"  # noqa: E731
    text = {text_name(n): m for n, m in modules.items() if is_text(n)}
    modules = {n: m for n, m in modules.items() if not is_text(n)}
    others = {(text_name(n) if is_text(n) else n): m for n, m in others.items()}
    return LoRAWeights(
        modules, "peft", text_encoder=text, hints=hints, unmapped=unmapped, others=others
    )


def _clip_has_text_model_level() -> bool:
    """True when the installed transformers' CLIP text models hold their layers under
    `text_model.` (before transformers 5, and the files' convention when it is absent)."""
    try:
        return int(importlib.metadata.version("transformers").split(".")[0]) < 5
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return True


def split_components(weights: LoRAWeights) -> dict[str, LoRAWeights]:
    """The adapters of a peft folder: {"": weights} for a U-Net-only LoRA, else one per
    component (unet, text_encoder, text_encoder_2), text modules named by their path in
    the installed transformers' CLIP text model."""
    texts = [n for n in [*weights.text_encoder, *weights.others] if is_text_module(n)]
    if not texts:
        return {"": weights}
    strip = "" if _clip_has_text_model_level() else "text_model."
    parts = {}
    unet = LoRAWeights(weights.modules, "peft", resolved=weights.resolved, hints=weights.hints)
    unet.others = {n: m for n, m in weights.others.items() if not is_text_module(n)}
    if unet.modules or unet.others:
        parts[UNET] = unet
    for component in (TEXT, TEXT_2):
        modules = _paths_in(weights.text_encoder, component, strip)
        part = LoRAWeights(modules, "peft", others=_paths_in(weights.others, component, strip))
        if part.modules or part.others:
            parts[component] = part
    return parts


def _paths_in(group: Mapping, component: str, strip: str) -> dict:
    """The members of `group` named `<component>.<path>`, by path (without `strip`)."""
    out = {}
    for name, m in group.items():
        first, _, path = name.partition(".")
        if first == component:
            out[path.removeprefix(strip)] = m
    return out


def join_components(parts: Mapping[str, LoRAWeights]) -> LoRAWeights:
    """One LoRA from the adapters of a peft folder's components (from_peft of each)."""
    out = LoRAWeights({}, "peft")
    for part in parts.values():
        out.modules |= part.modules
        out.text_encoder |= part.text_encoder
        out.others |= part.others
        out.unmapped |= part.unmapped
        out.hints = out.hints or part.hints
    return out


def lora_config(weights: LoRAWeights) -> dict:
    """The LoraConfig fields that reproduce every module's rank and scale exactly.

    r and lora_alpha are the most common values; other modules go into rank_pattern /
    alpha_pattern under anchored, escaped full names (never alpha = r by default).
    """
    ranks = {name: m.rank for name, m in weights.modules.items()}
    alphas = {name: clean_number(m.scale * m.rank) for name, m in weights.modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    exact = lambda name: "^" + re.escape(name)  # noqa: E731  full-name match in peft's rule
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {exact(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {exact(n): v for n, v in alphas.items() if v != alpha},
        "target_modules": sorted(weights.modules),
        "use_rslora": False,
    }


def check_writable(weights: LoRAWeights, layout: str) -> None:
    """LoRAError if the LoRA has no modules, modules of another kind, or names that are not
    dotted module paths."""
    for name, m in weights.others.items():
        raise LoRAError(
            f"module {name} is {m.describe()}: the {layout} layout holds plain LoRA "
            "only (condlora lora convert turns other kinds into LoRA by SVD; DoRA cannot be)"
        )
    if not weights.modules and not (layout == "diffusers" and weights.text_encoder):
        raise LoRAError(f"the LoRA has no U-Net modules to write as {layout}")
    if not weights.resolved:
        raise LoRAError(
            f"kohya module names cannot be written as {layout} without the base model's "
            "module list (--base-modules FILE)"
        )


def split_dora(weights: LoRAWeights) -> tuple[LoRAWeights, dict[str, Tensor]]:
    """(the LoRA with peft DoRA modules as their low-rank pairs, their magnitude vectors) when
    every module is one; else (the LoRA unchanged, {}). peft's use_dora is adapter-wide."""
    others = weights.others.values()
    if not others or weights.modules or weights.text_encoder:
        return weights, {}
    if not all(m.kind == "dora" for m in others):
        return weights, {}
    pairs = {n: ModuleLoRA(m.parts["A"], m.parts["B"], m.scale) for n, m in weights.others.items()}
    out = weights.replace_modules(pairs)
    out.others = {}
    return out, {n: m.parts["magnitude"] for n, m in weights.others.items()}


def to_peft(weights: LoRAWeights) -> tuple[dict[str, Tensor], dict]:
    """LoRAWeights -> (peft state dict, adapter_config.json contents); DoRA when every module
    is a peft DoRA module."""
    weights, magnitudes = split_dora(weights)
    check_writable(weights, "peft")
    tensors = {}
    for name, m in weights.modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.B
        if name in magnitudes:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = magnitudes[name]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": weights.hints.get("base_model_name_or_path"),
        **lora_config(weights),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": bool(magnitudes),
    }
    return tensors, config
