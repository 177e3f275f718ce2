"""kohya sd-scripts' layout, as dict-to-dict functions.

Key table (stem = `lora_unet_` + the module's dotted path with every `.` written as `_`):
    <stem>.lora_down.weight   A [r, in] or [r, in, k, k]
    <stem>.lora_up.weight     B [out, r] or [out, r, 1, 1]
    <stem>.alpha              alpha, a scalar (absent: alpha = r); scale alpha / r
    lora_te_* (SD 1.x) / lora_te1_* and lora_te2_* (SDXL)   text encoders (CLIP layers)
A stem cannot be turned back into a dotted path by guessing (module names hold underscores
themselves), so names are mapped through the base model's module list; SDXL files name
U-Net modules by their LDM paths (lora_unet_input_blocks_4_1_...), mapped the same way.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from condlora.core.errors import LoRAError
from condlora.lora.formats.keys import TEXT_2, is_text_module, ldm_table
from condlora.lora.formats.weights import BaseMismatch, LoRAWeights, ModuleLoRA, clean_number

UNET_PREFIX = "lora_unet_"
HINT_KEYS = ("ss_sd_model_name", "ss_base_model_version", "modelspec.architecture", "ss_v2")
MODELSPEC = "modelspec."  # the SAI model spec's header keys (Stability-AI/ModelSpec)
NOT_KEPT = ("modelspec.hash_sha256",)  # describes the source's bytes, not the written file's
# cross-attention width -> the base model's modelspec architecture, implementation and
# resolution, as kohya's sd-scripts writes them (SD 2.x's 1024 is 512 or 768-v: not told)
FAMILIES = {
    768: ("stable-diffusion-v1", "diffusers", "512x512"),
    2048: (
        "stable-diffusion-xl-v1-base",
        "https://github.com/Stability-AI/generative-models",
        "1024x1024",
    ),
}
# the header keys LoRA managers read (kohya's sd-scripts names), shown by `lora info`
NETWORK_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")
LYCORIS_ALGOS = {"loha": "loha", "lokr": "lokr", "full": "full", "tucker": "locon"}
# how the parts of other kinds are written (LyCORIS roles keep their own names)
ROLE_SUFFIXES = {
    "A": ".lora_down.weight",
    "B": ".lora_up.weight",
    "mid": ".lora_mid.weight",
    "dora_scale": ".dora_scale",
}


def kohya_stem(module: str) -> str:
    """The kohya name of a dotted module path (without the lora_unet_ prefix)."""
    return module.replace(".", "_")


def stem_table(base_modules: Iterable[str]) -> dict[str, list[str]]:
    """kohya stem -> the base model's module paths that it could name (by their diffusers
    path, or by their LDM path as kohya writes SDXL)."""
    table: dict[str, list[str]] = {}
    names = list(base_modules)
    for name in names:
        table.setdefault(kohya_stem(name), []).append(name)
    for name, ldm in ldm_table(names).items():
        names_of = table.setdefault(kohya_stem(ldm), [])
        if name not in names_of:
            names_of.append(name)
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


def uniform_alpha(weights: LoRAWeights) -> float:
    """The one alpha that a kohya file gets: the most common scale x r among its modules."""
    pairs = {**weights.modules, **weights.text_encoder}.values()
    alphas = [clean_number(m.scale * m.rank) for m in pairs]
    return Counter(alphas).most_common(1)[0][0]


def with_alpha(m: ModuleLoRA, alpha: float) -> ModuleLoRA:
    """The same dW with scale alpha / r: the factor c = scale r / alpha is split as sqrt(|c|)
    into A and B (the sign into B), so that both stay of like size."""
    scale = alpha / m.rank
    c = m.scale / scale
    if abs(c - 1.0) <= 1e-12:
        return ModuleLoRA(m.A, m.B, scale)
    root = math.sqrt(abs(c))
    return ModuleLoRA(m.A * root, m.B * (root if c > 0 else -root), scale)


def _text_prefix(name: str, two_encoders: bool) -> tuple[str, str]:
    """(kohya prefix, module path) of a `text_encoder.<path>` / `text_encoder_2.<path>` name."""
    component, path = name.split(".", 1)
    if component == TEXT_2:
        return "lora_te2_", path
    return ("lora_te1_" if two_encoders else "lora_te_"), path


def to_kohya(weights: LoRAWeights) -> tuple[dict[str, Tensor], dict[str, str]]:
    """LoRAWeights -> (kohya state dict, file metadata), one alpha for the whole file.

    diffusers' kohya loader gives every attention projection the same alpha, so modules with
    another scale x r carry their factor in A and B (dW unchanged) under the common alpha.
    """
    if not (weights.modules or weights.text_encoder or weights.others):
        raise LoRAError("the LoRA has no modules to write as kohya")
    alpha = uniform_alpha(weights) if weights.modules or weights.text_encoder else 1.0
    two = any(name.startswith(TEXT_2 + ".") for name in [*weights.text_encoder, *weights.others])
    stems = {name: _stem(name, two) for name in [*weights.modules, *weights.text_encoder]}
    stems |= {name: _stem(name, two) for name in weights.others}
    if len(set(stems.values())) < len(stems):
        raise LoRAError("two modules share a kohya name; cannot write as kohya")
    tensors: dict[str, Tensor] = {}
    for name, m in {**weights.modules, **weights.text_encoder}.items():
        m, stem = with_alpha(m, alpha), stems[name]
        tensors[f"{stem}.lora_down.weight"] = m.A
        tensors[f"{stem}.lora_up.weight"] = m.B
        tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    for name, m in weights.others.items():  # LyCORIS kinds: their own tensors and alpha
        if "magnitude" in m.parts:
            raise LoRAError(
                f"module {name} is a peft DoRA module: kohya's dora_scale is another "
                "convention, so the kohya layout cannot hold it"
            )
        for role, t in m.parts.items():
            tensors[stems[name] + ROLE_SUFFIXES.get(role, f".{role}")] = t
    return tensors, kohya_metadata(weights, alpha)


def kohya_metadata(weights: LoRAWeights, alpha: float) -> dict[str, str]:
    """The header of a kohya file: the network module, dim and alpha as sd-scripts writes
    them (LyCORIS kinds: lycoris.kohya with the algorithm in ss_network_args), and the
    base-model keys the source file carried."""
    ranks = [m.rank for m in {**weights.modules, **weights.text_encoder}.values()]
    ranks += [m.rank for m in weights.others.values() if m.rank]
    metadata = {"format": "pt", "ss_network_alpha": str(clean_number(alpha))}
    if ranks:
        metadata["ss_network_dim"] = str(max(ranks))
    kinds = sorted({m.kind for m in weights.others.values()} - {"dora", "kohya_dora"})
    if kinds:
        metadata["ss_network_module"] = "lycoris.kohya"
        algo = LYCORIS_ALGOS.get(kinds[0], kinds[0])
        metadata["ss_network_args"] = json.dumps({"algo": algo})
    else:
        metadata["ss_network_module"] = "networks.lora"
    metadata |= {k: v for k, v in weights.hints.items() if k in HINT_KEYS}
    return metadata


def header_hints(metadata: Mapping[str, str]) -> dict[str, str]:
    """The header keys of a file that condlora keeps and shows: kohya's base-model and
    network keys and every modelspec.* key (but its hash)."""
    keys = [*HINT_KEYS, *NETWORK_KEYS]
    keys += [k for k in metadata if k.startswith(MODELSPEC) and k not in NOT_KEPT]
    return {k: str(metadata[k]) for k in dict.fromkeys(keys) if metadata.get(k)}


def cross_attention(weights: LoRAWeights) -> tuple[int, str] | None:
    """(the text encoder's width, the module it is read from): the input width of a
    cross-attention key projection (attn2.to_k), or None if the LoRA adapts none."""
    for name, m in weights.modules.items():
        if name.endswith(("attn2.to_k", "attn2_to_k")) and not m.is_conv:
            return m.A.shape[1], name
    return None


def modelspec(weights: LoRAWeights, title: str) -> dict[str, str]:
    """The SAI model spec header of a written LoRA file: the source's modelspec.* keys
    kept, and the required ones it lacks filled in where the LoRA shows them (the base
    family from its cross-attention width, or SDXL from a second text encoder; the title
    from the file's name)."""
    spec = {k: v for k, v in weights.hints.items() if k.startswith(MODELSPEC)}
    spec.setdefault("modelspec.sai_model_spec", "1.0.0")
    spec.setdefault("modelspec.title", title)
    width = cross_attention(weights)
    texts = [*weights.text_encoder, *weights.others]
    if width is None and any(n.startswith(TEXT_2 + ".") for n in texts):
        width = (2048, "text_encoder_2")
    family = FAMILIES.get(width[0]) if width else None
    if family and "modelspec.architecture" not in spec:
        spec["modelspec.architecture"] = f"{family[0]}/lora"
        spec.setdefault("modelspec.implementation", family[1])
        spec.setdefault("modelspec.resolution", family[2])
    return spec


def _stem(name: str, two_encoders: bool) -> str:
    """The kohya key stem of a U-Net path or a `text_encoder.<path>` name."""
    if is_text_module(name):
        prefix, path = _text_prefix(name, two_encoders)
        return prefix + kohya_stem(path)
    return UNET_PREFIX + kohya_stem(name)
