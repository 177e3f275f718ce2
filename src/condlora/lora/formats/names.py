"""Module names in a LoRA file -> the base model's dotted module paths.

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
