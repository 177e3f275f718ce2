"""Wrapping target layers from outside the model, and taking the wrappers out again."""

from __future__ import annotations

import copy
import difflib
import re

from torch import Tensor, nn

from condlora.core.errors import LoRAError
from condlora.lora.composers import build_composer
from condlora.lora.config import LoRAConfig
from condlora.lora.layer import CondLoRALayer, check_target
from condlora.lora.runtime import (
    ConditionState,
    EmbCapture,
    PassScope,
    lora_layers,
)


def matches(name: str, pattern: str) -> bool:
    """True if module `name` is `pattern`, ends with `.pattern`, or fully matches it as regex."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _no_match_error(model: nn.Module, targets: list[str]) -> LoRAError:
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d)
    names = [n for n, m in model.named_modules() if n and isinstance(m, kinds)]
    names = names or [n for n, _ in model.named_modules() if n]
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return LoRAError(
        f"LoRA targets {targets} match no module; Linear/Conv modules that exist: {shown}"
    )


def _emb_dim(config: LoRAConfig, modules: dict[str, nn.Module]) -> int:
    """UC-LoRA input width: config.emb_dim, or out_features of emb_module's last Linear."""
    name = config.emb_module
    if name is not None and name not in modules:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.3)
        raise LoRAError(f"emb_module {name!r} is not in the model; close names: {close}")
    if config.emb_dim is not None:
        return config.emb_dim
    if name is None:
        raise LoRAError("UC-LoRA needs LoRAConfig.emb_dim or emb_module to infer it from")
    linears = [m for m in modules[name].modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise LoRAError(f"emb_module {name!r} holds no nn.Linear; set LoRAConfig.emb_dim")
    return linears[-1].out_features


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def inject(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap every target of `config` in `model` in place; returns the wrapped names, sorted.

    Method "none" wraps nothing and returns []. Base parameters keep their requires_grad.
    """
    if config.method == "none":
        return []
    if lora_layers(model):
        raise LoRAError("model already has LoRA layers; call remove(model) before injecting again")
    modules = dict(model.named_modules())
    names = sorted(n for n in modules if n and any(matches(n, p) for p in config.targets))
    if not names:
        raise _no_match_error(model, list(config.targets))
    for name in names:
        check_target(name, modules[name])
    config = copy.deepcopy(config)
    if config.method == "uc":
        config.emb_dim = _emb_dim(config, modules)
    state = ConditionState(config)
    for name in names:
        composer = build_composer(config, config.emb_dim)
        layer = CondLoRALayer(
            modules[name],
            config.rank,
            composer,
            state,
            config.scale,
            config.bias,
            config.bias_per_rank,
        )
        _replace(model, name, layer)
    if config.method == "uc" and config.emb_module is not None:
        modules[config.emb_module].register_forward_hook(EmbCapture(state))
    model.register_forward_pre_hook(PassScope(state, begin=True))
    model.register_forward_hook(PassScope(state, begin=False), always_call=True)
    return names


def _remove_hooks(model: nn.Module) -> None:
    # Found by type rather than by stored handles, so this also works on a deep copy.
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(hook, (EmbCapture, PassScope)):
                    del hooks[key]
                    getattr(module, "_forward_hooks_with_kwargs", {}).pop(key, None)
                    getattr(module, "_forward_hooks_always_called", {}).pop(key, None)


def remove(model: nn.Module) -> None:
    """Put the original modules back (unmerging first) and drop the emb hooks."""
    for name, layer in lora_layers(model).items():
        if layer.merged:
            layer.unmerge()
        _replace(model, name, layer.base_layer)
    _remove_hooks(model)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """A, B, E and composer parameters of every wrapper (base parameters excluded)."""
    params: dict[int, nn.Parameter] = {}
    for layer in lora_layers(model).values():
        for key, param in layer.named_parameters():
            if not key.startswith("base_layer."):
                params.setdefault(id(param), param)
    return list(params.values())


def count_lora_parameters(model: nn.Module) -> int:
    """Number of scalars in `lora_parameters(model)`."""
    return sum(p.numel() for p in lora_parameters(model))


def lora_state_dict(model: nn.Module, keep_vars: bool = False) -> dict[str, Tensor]:
    """LoRA tensors under their full module names, e.g. `blocks.0.qkv.lora_A`."""
    out = {}
    for name, layer in lora_layers(model).items():
        for key, value in layer.state_dict(keep_vars=keep_vars).items():
            if not key.startswith("base_layer."):
                out[f"{name}.{key}"] = value
    return out
