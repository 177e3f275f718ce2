"""Parameter counts: total, LoRA, and the conditioning path."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from condlora.lora import count_lora_parameters

# Module-name parts that make up the backbone's conditioning path: the noise / class
# embedding and the residual blocks' embedding projections (scale-and-shift), for
# SmallUNet, ADMUNet and DDPMppUNet.
CONDITIONING_MODULES = (
    *("embed", "emb_proj"),
    *("time_embed", "label_emb", "emb_layers"),
    *("map_label", "map_augment", "map_layer0", "map_layer1", "affine"),
)


def _is_conditioning(name: str) -> bool:
    return any(part in CONDITIONING_MODULES for part in name.split("."))


def parameter_summary(model: nn.Module) -> dict[str, int]:
    """{"parameters": total, "lora parameters": ..., "conditioning parameters": ...}."""
    total = sum(p.numel() for p in model.parameters())
    lora = count_lora_parameters(model)
    cond = sum(p.numel() for n, p in model.named_parameters() if _is_conditioning(n))
    return {"parameters": total, "lora parameters": lora, "conditioning parameters": cond}


def info_lines(path: str | Path, overrides: list[str] | None = None) -> list[str]:
    """`condlora info` for an image config: its parameter counts, one "key: value" a line."""
    from condlora.image.build import build_denoiser
    from condlora.image.checks import check_model_size
    from condlora.image.config import load_config

    cfg = load_config(path, overrides)
    check_model_size(cfg)  # a model too large is refused before it is allocated
    model = build_denoiser(cfg)
    return [f"{key}: {value}" for key, value in parameter_summary(model).items()]
