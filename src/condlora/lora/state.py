"""The condition shared by all wrappers of one injection, and the hooks that capture `emb`."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from condlora.core.errors import LoRAError
from condlora.lora.composers import check_class_range, class_weights, time_input
from condlora.lora.config import LoRAConfig


class ConditionState:
    """Current (t, y, emb) for one injected model; every wrapper holds the same object."""

    def __init__(self, config: LoRAConfig) -> None:
        self.config = config
        self.t: Tensor | None = None  # (batch,) float in [0, 1]
        self.y: Tensor | None = None  # (batch, num_classes) float class weights
        self.emb: Tensor | None = None  # (batch, emb_dim), given explicitly
        self.captured_emb: Tensor | None = None  # (batch, emb_dim), from the emb_module hook

    def snapshot(self) -> tuple[Any, Any, Any]:
        """The explicit condition as stored (already checked), for `restore`."""
        return self.t, self.y, self.emb

    def restore(self, snapshot: tuple[Any, Any, Any]) -> None:
        """Put back a condition taken by `snapshot` (no second check or conversion)."""
        self.t, self.y, self.emb = snapshot

    def set(self, t: Any = None, y: Any = None, emb: Any = None) -> None:
        """Check and store a user condition; inputs that the method does not read are ignored."""
        method = self.config.method
        uses_t, uses_y = "time" in method, "class" in method
        self.t = time_input(t) if uses_t and t is not None else None
        if uses_y and y is not None:
            check_class_range(y, self.config.num_classes)  # once here, not in every layer
            self.y = class_weights(y, self.config.num_classes)
        else:
            self.y = None
        self.emb = emb if method == "uc" else None

    def inputs(self) -> dict[str, Tensor | None]:
        """Keyword inputs for a composer; an explicit emb wins over the captured one."""
        emb = self.emb if self.emb is not None else self.captured_emb
        if emb is None and self.config.method == "uc" and self.config.emb_module is not None:
            raise LoRAError(
                f"UC-LoRA needs emb, and emb_module {self.config.emb_module!r} has not run yet "
                "in this forward pass (it must run before the wrapped layers); or pass it: "
                "`with conditioning(model, emb=...)`"
            )
        return {"t": self.t, "y": self.y, "emb": emb}


class EmbCapture:
    """Forward hook on the host's embedding module: its output becomes the current emb."""

    def __init__(self, state: ConditionState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        """Store the module's output (first element if it returns a tuple)."""
        self.state.captured_emb = output[0] if isinstance(output, (tuple, list)) else output


class EmbReset:
    """Pre- and post-forward hook on the injected model: forget the emb of an earlier pass.

    Clearing after the pass also keeps the model deep-copyable (no graph tensor held).
    """

    def __init__(self, state: ConditionState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, *args: Any) -> None:
        """Drop the captured embedding."""
        self.state.captured_emb = None
