"""Every key of a single-file LoRA (diffusers old and new, kohya, ComfyUI) -> what it holds.

A key is `<prefix><module><suffix>`:
    prefix  unet. / text_encoder. / text_encoder_2. (diffusers), none (save_lora_adapter),
            lora_unet_ / lora_te_ / lora_te1_ / lora_te2_ (kohya, module written with `_`),
            diffusion_model. / text_encoders.clip_l.transformer. (ComfyUI, A1111)
    suffix  .lora_A.weight / .lora_B.weight (peft, diffusers), .lora_down.weight /
            .lora_up.weight (kohya), .lora.down.weight / .lora.up.weight and
            .lora_linear_layer.down.weight / .up.weight (diffusers < 0.25), .alpha;
            LyCORIS (prefix lycoris_ or kohya's): .hada_w1_a ..., .lokr_w1 ..., .diff,
            .diff_b, .lora_mid.weight; DoRA: .dora_scale, .lora_magnitude_vector
Older diffusers wrote attention LoRAs under the attention processor:
    <attn>.processor.to_q_lora.down.weight   = <attn>.to_q's A   (to_out_lora: to_out.0)
    text_encoder.<...>.self_attn.to_q_lora.down.weight = <...>.self_attn.q_proj's A
and keyed a module's alpha after its down factor (the network_alphas of diffusers < 0.25):
    <attn>.processor.to_q_lora.down.weight.alpha = <attn>.to_q's alpha
    <module>.lora.down.weight.alpha              = <module>'s alpha
A key that fits none of this gets a reason instead, so that no key is dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNET, TEXT, TEXT_2 = "unet", "text_encoder", "text_encoder_2"
COMPONENTS = (UNET, TEXT, TEXT_2)

# key prefix -> (component, naming): "dotted" module paths or kohya "stem"s (dots as `_`)
PREFIXES = (
    ("unet.", UNET, "dotted"),
    ("text_encoder_2.", TEXT_2, "dotted"),
    ("text_encoder.", TEXT, "dotted"),
    ("diffusion_model.", UNET, "dotted"),
    ("text_encoders.clip_l.transformer.", TEXT, "dotted"),
    ("text_encoders.clip_g.transformer.", TEXT_2, "dotted"),
    ("lora_unet_", UNET, "stem"),
    ("lycoris_", UNET, "stem"),
    ("lora_te2_", TEXT_2, "stem"),
    ("lora_te1_", TEXT, "stem"),
    ("lora_te_", TEXT, "stem"),
)
KOHYA_PREFIXES = tuple(p for p, _, naming in PREFIXES if naming == "stem")
COMFY_PREFIXES = ("diffusion_model.", "text_encoders.")

SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_down.weight": "A",
    ".lora_up.weight": "B",
    ".lora.down.weight": "A",
    ".lora.up.weight": "B",
    ".lora_linear_layer.down.weight": "A",
    ".lora_linear_layer.up.weight": "B",
    ".alpha": "alpha",
    ".lora_mid.weight": "mid",
    ".dora_scale": "dora_scale",  # kohya / LyCORIS convention (peft's: magnitude)
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    ".diff": "diff",
    ".diff_b": "diff_b",
    **{f".{role}": role for role in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
    **{f".{role}": role for role in ("hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b")},
    **{f".{role}": role for role in ("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
}

# older diffusers' attention-processor keys, rewritten to the module's own path first
OLD_KEYS = (
    (re.compile(r"\.processor\.(to_q|to_k|to_v|add_k_proj|add_v_proj)_lora\."), r".\1.lora."),
    (re.compile(r"\.processor\.to_out_lora\."), ".to_out.0.lora."),
    (re.compile(r"\.self_attn\.to_(q|k|v)_lora\."), r".self_attn.\1_proj.lora."),
    (re.compile(r"\.self_attn\.to_out_lora\."), ".self_attn.out_proj.lora."),
    # an alpha named after its down factor, as diffusers < 0.25 keyed network alphas
    (re.compile(r"\.(?:lora|lora_linear_layer)\.down\.weight\.alpha$"), ".alpha"),
)

# what an unmapped key most likely is, by a pattern in its name
KNOWN_OTHERS = (
    (r"dora_scale|lora_magnitude_vector", "DoRA magnitude vector"),
    (r"\.hada_[wt]", "LyCORIS LoHa factor"),
    (r"\.lokr_[wt]", "LyCORIS LoKr factor"),
    (r"\.lora_mid\.", "conv LoRA middle (Tucker) factor"),
    (r"\.(diff_b|bias)$|\.bias\.", "bias update"),
    (r"\.diff$", "full weight difference"),
    (r"lora_embedding_", "embedding LoRA"),
)


def is_text_module(name: str) -> bool:
    """True for a `text_encoder.<path>` / `text_encoder_2.<path>` module name."""
    return name.split(".", 1)[0] in (TEXT, TEXT_2)


@dataclass(frozen=True)
class ParsedKey:
    """One LoRA key: its component, module name (dotted path or kohya stem) and role."""

    component: str
    naming: str  # "dotted" or "stem"
    module: str
    role: str  # "A", "B", "alpha", or another kind's part (kinds.py)


def unmapped_reason(key: str) -> str:
    """Why a key is not read as part of a LoRA: the variant it belongs to, if known."""
    for pattern, what in KNOWN_OTHERS:
        if re.search(pattern, key):
            return f"{what}: not read"
    return "no known LoRA key pattern"


def parse_key(key: str) -> ParsedKey | str:
    """A key's ParsedKey, or the reason (text) why it is no part of a module's update."""
    component, naming, body = UNET, "dotted", key
    for prefix, comp, style in PREFIXES:
        if key.startswith(prefix):
            component, naming, body = comp, style, key[len(prefix) :]
            break
    for pattern, replacement in OLD_KEYS:
        body = pattern.sub(replacement, body)
    suffix = next((s for s in SUFFIXES if body.endswith(s)), None)
    if suffix is None or len(body) == len(suffix):
        return unmapped_reason(key)
    return ParsedKey(component, naming, body[: -len(suffix)], SUFFIXES[suffix])


def key_layout(keys: list[str]) -> str | None:
    """The layout family of a single file's keys (lycoris, kohya, comfyui, diffusers), None if
    no key is a LoRA factor."""
    if not any(isinstance(parse_key(k), ParsedKey) and not k.endswith(".alpha") for k in keys):
        return None
    if any(k.startswith("lycoris_") for k in keys):
        return "lycoris"
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(k.startswith(COMFY_PREFIXES) for k in keys):
        return "comfyui"
    return "diffusers"
