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

The module part -> the base model's dotted module paths:
U-Net names come as diffusers paths (`down_blocks.1.attentions.0.proj_in`) or as the original
LDM / SGM paths that kohya (SDXL), ComfyUI and A1111 use (`input_blocks.4.1.proj_in`), dotted or
written with `_` (kohya stems). The LDM path of every diffusers module follows from the base
model's own block structure (how many resnets each block has, which have attentions):

    input_blocks.0.0 = conv_in;  input_blocks.n = (resnet j, attention j) of down block i, or
        its downsampler (`.0.op`), counting n = 1, 2, ... through the blocks in order
    middle_block.0 / .1 / .2 = mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.n = (resnet j, attention j, upsampler) of up block i, counting from 0
    resnet parts: in_layers.0/.2 = norm1/conv1, emb_layers.1 = time_emb_proj,
        out_layers.0/.3 = norm2/conv2, skip_connection = conv_shortcut
    time_embed.0/.2, label_emb.0.0/.0.2, out.0/.2 = time_embedding.linear_1/_2,
        add_embedding.linear_1/_2, conv_norm_out/conv_out
Text-encoder stems name CLIP layers (`text_model_encoder_layers_0_self_attn_q_proj`), whose
paths have a fixed form and are mapped without a module list.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
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


TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.")
BLOCK = re.compile(r"^(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(resnets|attentions)\.(\d+)")
SAMPLER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv$")
# a CLIP layer's kohya stem (lycoris' own files of a transformers-5 CLIP lack text_model_)
CLIP_STEM = re.compile(
    r"^(?:text_model_)?encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc(1|2))$"
)


def looks_ldm(name: str) -> bool:
    """True for an LDM / SGM U-Net path (input_blocks..., middle_block..., out.2 ...)."""
    return name.startswith(LDM_ROOTS) or name in ("out.0", "out.2")


def _counts(names: Iterable[str]) -> dict[tuple[str, int], dict[str, set[int]]]:
    """(down_blocks|up_blocks, block index) -> {resnets|attentions|samplers: indices}."""
    blocks: dict[tuple[str, int], dict[str, set[int]]] = {}
    for name in names:
        m = BLOCK.match(name)
        if m and m.group(1) != "mid_block":
            parts = blocks.setdefault((m.group(1), int(m.group(2))), {})
            parts.setdefault(m.group(3), set()).add(int(m.group(4)))
        m = SAMPLER.match(name)
        if m:
            blocks.setdefault((m.group(1), int(m.group(2))), {})["samplers"] = {0}
    return blocks


def _block_starts(blocks: dict, kind: str, first: int) -> dict[int, int]:
    """Block index -> the LDM index of its first layer (blocks laid out one after another)."""
    starts, n = {}, first
    for i in sorted(i for k, i in blocks if k == kind):
        starts[i] = n
        parts = blocks[(kind, i)]
        layers = len(parts.get("resnets", ()))
        n += layers + (1 if kind == "down_blocks" and parts.get("samplers") else 0)
    return starts


def ldm_table(base_modules: Iterable[str]) -> dict[str, str]:
    """The base model's diffusers module paths -> their LDM paths (those that have one)."""
    names = list(base_modules)
    blocks = _counts(names)
    starts = {
        "down_blocks": _block_starts(blocks, "down_blocks", 1),
        "up_blocks": _block_starts(blocks, "up_blocks", 0),
    }
    table = {}
    for name in names:
        ldm = _ldm_name(name, blocks, starts)
        if ldm is not None:
            table[name] = ldm
    return table


def _ldm_name(name: str, blocks: dict, starts: dict) -> str | None:
    """One diffusers path's LDM path, or None (not a U-Net block path)."""
    for top, ldm in TOP_LEVEL.items():
        if name == top or name.startswith(top + "."):
            return ldm + name[len(top) :]
    m = SAMPLER.match(name)
    if m:
        kind, i = m.group(1), int(m.group(2))
        parts = blocks[(kind, i)]
        if kind == "down_blocks":
            return f"input_blocks.{starts[kind][i] + len(parts.get('resnets', ()))}.0.op"
        last = starts[kind][i] + len(parts.get("resnets", ())) - 1
        return f"output_blocks.{last}.{2 if parts.get('attentions') else 1}.conv"
    m = BLOCK.match(name)
    if not m:
        return None
    kind, part, j = m.group(1), m.group(3), int(m.group(4))
    rest = name[m.end() :]
    if part == "resnets":
        inner = rest[1:].split(".", 1)
        if inner[0] in RESNET_PARTS:
            rest = "." + ".".join([RESNET_PARTS[inner[0]], *inner[1:]])
    if kind == "mid_block":
        index = 1 if part == "attentions" else 2 * j
        return f"middle_block.{index}{rest}"
    root = "input_blocks" if kind == "down_blocks" else "output_blocks"
    return f"{root}.{starts[kind][int(m.group(2))] + j}.{1 if part == 'attentions' else 0}{rest}"


def clip_path(stem: str) -> str | None:
    """The dotted CLIP text-encoder path of a kohya text stem, or None if it is not a layer."""
    m = CLIP_STEM.match(stem)
    if not m:
        return None
    layer = m.group(2).replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
    return f"text_model.encoder.layers.{m.group(1)}.{layer}"
