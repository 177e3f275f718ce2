"""`condlora train --init-from`: start a run from another run's weights, matched by name.

The paper trains its LoRA models from a trained baseline; this is also how a user adds LoRA
conditioning to a model they already have. Weights are matched by module name, with the
LoRA wrapper's `.base_layer` step ignored, and copied with a shape check. What the source
lacks stays fresh (the LoRA, whose B = 0 leaves the function unchanged) and what the target
lacks is left out (the scale-and-shift layers that "only LoRA" drops); both are listed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from condlora.core.errors import CondloraError
from condlora.train.checkpoint import CHECKPOINT_NAME

LORA_PARTS = (".lora_A", ".lora_B", ".lora_E", ".composer.")


def _plain_name(name: str) -> str:
    """A parameter name without the LoRA wrapper's `.base_layer` step."""
    return name.replace(".base_layer.", ".")


def source_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a run folder or of a condlora checkpoint file, by plain name."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CondloraError(f"--init-from: no such run or checkpoint: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") != "condlora-checkpoint-1":
                raise CondloraError(f"--init-from: {path} is not a condlora checkpoint")
            return {
                _plain_name(k[len("ema.") :]): f.get_tensor(k)
                for k in f.keys()
                if k.startswith("ema.")
            }
    except CondloraError:
        raise
    except Exception as err:  # safetensors' own errors on a damaged file
        raise CondloraError(f"--init-from: cannot read {path}: {err}") from None


def _summary(names: list[str]) -> str:
    lora = [n for n in names if any(part in n for part in LORA_PARTS)]
    other = [n for n in names if n not in lora]
    parts = [f"{len(lora)} LoRA tensors"] if lora else []
    if other:
        more = ", ..." if len(other) > 4 else ""
        parts.append(f"{len(other)} others ({', '.join(other[:4])}{more})")
    return "; ".join(parts) or "none"


def init_from(model: nn.Module, path: str | Path, verbose: bool = True) -> dict[str, list[str]]:
    """Copy the source's weights into `model` by name; {"copied", "fresh", "unused"} names."""
    source = source_weights(path)
    targets = {_plain_name(k): v for k, v in model.state_dict(keep_vars=True).items()}
    shared = [k for k in targets if k in source]
    bad = [
        f"{k} {tuple(source[k].shape)} != {tuple(targets[k].shape)}"
        for k in shared
        if source[k].shape != targets[k].shape
    ]
    if bad:
        raise CondloraError(
            f"--init-from {path} does not fit this config: shape mismatches ({len(bad)}): "
            f"{', '.join(bad[:3])}"
        )
    if not shared:
        raise CondloraError(f"--init-from {path} shares no weight names with this config's net")
    with torch.no_grad():
        for k in shared:
            targets[k].copy_(source[k])
    report = {
        "copied": shared,
        "fresh": [k for k in targets if k not in source],
        "unused": [k for k in source if k not in targets],
    }
    if verbose:
        print(
            f"init-from {path}: copied {len(shared)} tensors; fresh: {_summary(report['fresh'])}; "
            f"not used: {_summary(report['unused'])}"
        )
    return report
