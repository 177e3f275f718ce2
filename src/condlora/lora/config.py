"""LoRAConfig: which layers get a conditional LoRA, and how its bases are mixed."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from condlora.core.config import Checked, Each, OneOf, Range, from_dict
from condlora.core.errors import ConfigError, LoRAError

METHODS = ("none", "time", "class", "uc", "time+class")


def mlp_group_count(groups: int | str, width: int) -> int:
    """GroupNorm groups of a UC-LoRA MLP layer of `width`: `groups`, or for "auto" the paper's
    code's rule min(32, width // 4) (EDM's GroupNorm: 32 groups of at least 4 channels)."""
    return max(min(32, width // 4), 1) if groups == "auto" else int(groups)


@dataclass
class LoRAConfig(Checked):
    """Conditional LoRA settings; stored as JSON in every saved LoRA file."""

    method: str = "none"  # "none" | "time" | "class" | "uc" | "time+class"
    rank: int = 4  # r, rank of each basis
    num_bases: int = 8  # m for TimeLoRA and UC-LoRA
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj"])  # name, suffix or regex
    scale: float = 1.0  # s, multiplies the whole update
    bias: bool = False  # per-basis bias E
    bias_per_rank: bool = False  # E with one row per rank-1 component (m*r rows, paper's code)
    num_time_rows: int = 1000  # rows of the TimeLoRA table; time in [0, 1] spans them linearly
    num_classes: int = 10  # ClassLoRA classes
    class_bases: int = 0  # 0: one LoRA per class; >0: learned (classes x class_bases) mixing
    mlp_widths: list[int] = field(default_factory=lambda: [128, 64])  # UC-LoRA MLP hidden widths
    mlp_groups: int | str = 8  # UC-LoRA MLP GroupNorm groups; "auto": min(32, width // 4)
    emb_module: str | None = None  # host module whose output is UC-LoRA's input (forward hook)
    emb_dim: int | None = None  # UC-LoRA input width; None: emb_module's last Linear out_features

    # valid values, checked when a config is built (condlora.core.config.Checked)
    ERROR: ClassVar[type[Exception]] = LoRAError
    CHECKS: ClassVar[dict] = {
        "method": OneOf(METHODS),
        "rank": Range(1, 2**16),
        "num_bases": Range(1, 2**16),
        "targets": Each(),
        "scale": Range(),
        "num_time_rows": Range(1, 10**6),
        "num_classes": Range(1, 10**6),
        "class_bases": Range(0, 10**6),
        "mlp_widths": Each(Range(1, 2**16), allow_empty=True),
        "emb_dim": Range(1, 2**20),
    }

    def check(self, key: Callable[[str], str]) -> None:
        """The GroupNorm rules of UC-LoRA's MLP."""
        groups = self.mlp_groups
        if groups != "auto" and (isinstance(groups, bool | str) or groups < 1):
            raise LoRAError(f'{key("mlp_groups")} must be >= 1 or "auto", got {groups!r}')
        if self.method == "uc":
            bad = [w for w in self.mlp_widths if w < 1 or w % mlp_group_count(groups, w)]
            if bad:
                raise LoRAError(
                    f"UC-LoRA MLP widths {bad} are not positive multiples of their "
                    f"GroupNorm groups ({key('mlp_groups')}={groups!r}; GroupNorm needs that)"
                )

    @property
    def num_class_weights(self) -> int:
        """Width m of the ClassLoRA bank: num_classes, or class_bases if compositional."""
        return self.class_bases or self.num_classes

    def to_json(self) -> str:
        """Serialise to a JSON string (sorted keys)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoRAConfig:
        """Rebuild from `to_json` output; unknown keys are an error."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LoRAError(f"LoRA config is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise LoRAError(f"LoRA config is not a JSON object: {text[:60]!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoRAError(f"unknown LoRA config keys {unknown}; known: {sorted(known)}")
        try:
            return from_dict(cls, data)
        except ConfigError as err:
            raise LoRAError(f"LoRA config: {err}") from None
