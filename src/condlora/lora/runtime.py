"""The conditional-LoRA runtime: how a condition reaches every wrapped layer in a forward pass.

A forward pass of an injected model, step by step:

1. Condition set. `with conditioning(model, t=..., y=..., emb=...)` checks the condition
   once (class range, time shape) and stores it in the injection's one `ConditionState`,
   which every `CondLoRALayer` of the model holds.
2. Pass begins. A pre-forward hook on the model (`PassScope`) marks the start: nothing of
   an earlier pass (captured embedding, basis weights) is kept.
3. Embedding captured. For UC-LoRA a forward hook on the host's embedding module
   (`EmbCapture`, on `emb_module`) stores its output as this pass's `emb`.
4. Composers batched. The first wrapped layer to run asks the state for its basis weights
   w(c); the state runs the composers of all L wrappers in one batched call (stacked
   parameters cached while unchanged) and hands each layer its row. When every row of the
   condition agrees and no gradient is needed, it computes one row for the whole batch.
5. Merge or low-rank. Each layer then applies W x + s B((w ⊗ 1_r) ⊙ A x) + w E: merged into
   one weight when the batch shares its condition (sampling), else on the low-rank path
   (`condlora.lora.layer`). The merged weights are formed by group: the first layer of a
   shape to merge has the state form W + dW and b + db of every wrapper of that shape in a
   few batched ops, and the others take theirs, so no op runs per layer but its own.
6. Pass ends. A post-forward hook (always called, also on errors) drops the pass's tensors,
   so no graph is held and the model stays deep-copyable.
7. Recomputation. Under gradient checkpointing a block runs again in the backward pass,
   after the pass ended: `checkpointed` gives it the state it saw the first time.

`merge` / `merged` fold the update at one fixed condition into the weights outright.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from condlora.core.errors import LoRAError
from condlora.core.structure import structure_version
from condlora.lora.composers import ParameterStacks, check_class_range, class_weights, time_input
from condlora.lora.config import LoRAConfig


def _rows_agree(x: Tensor | None) -> bool:
    """True if x is None, has one row, or every row equals the first up to float rounding
    (a host's embedding of one condition can differ in the last bits between rows, by the
    blocking of the kernel that computed it)."""
    if x is None or x.shape[0] == 1:
        return True
    first = x[:1].expand_as(x)
    return torch.equal(x, first) or torch.allclose(x, first, rtol=1e-6, atol=1e-7)  # one op first


class ConditionState:
    """Current (t, y, emb) for one injected model; every wrapper holds the same object."""

    def __init__(self, config: LoRAConfig) -> None:
        self.config = config
        self.t: Tensor | None = None  # (batch,) float in [0, 1]
        self.y: Tensor | None = None  # (batch, num_classes) float class weights
        self.emb: Tensor | None = None  # (batch, emb_dim), given explicitly
        self.captured_emb: Tensor | None = None  # (batch, emb_dim), from the emb_module hook
        self.layers: list[nn.Module] = []  # every wrapper, in wrapping order
        self.composers: list[nn.Module] = []  # their composers (row `layer.index` of a batch)
        self.stacks = ParameterStacks()  # stacked parameters, reused while unchanged
        self.in_pass = False  # inside a forward pass of the injected model
        self._plan: tuple | None = None  # (structure count, `_batch_plan`)
        self._w: Tensor | None = None  # this pass's w of the L wrappers, in batch order
        self._weights: tuple | None = None  # this pass's (ws, w) of each wrapper
        self._merged: dict[int, tuple] = {}  # this pass's merged (weight, bias) by wrapper
        self._shared: bool | None = None  # do all rows of the condition agree?

    def register(self, layer: nn.Module) -> int:
        """Add a wrapper (it has `composer` and `merge_key`); returns its index here."""
        self.layers.append(layer)
        self.composers.append(layer.composer)
        self._plan = None
        return len(self.layers) - 1

    def _batch_plan(self) -> tuple[list, list[int], list[int], list[tuple[int, int]]]:
        """(composers in batch order, the wrappers in batch order, each wrapper's row in the
        batch, the rows of the group it merges with): wrappers of one shape (`merge_key`) sit
        side by side, so a group's weights are one slice. Kept while no module's structure
        changes."""
        if self._plan is None or self._plan[0] != structure_version():
            groups: dict[tuple, list[int]] = {}
            for i, layer in enumerate(self.layers):
                groups.setdefault(layer.merge_key(), []).append(i)
            order = [i for members in groups.values() for i in members]
            row, span, start = [0] * len(order), [(0, 0)] * len(order), 0
            for members in groups.values():
                for j, i in enumerate(members):
                    row[i], span[i] = start + j, (start, start + len(members))
                start += len(members)
            composers = [self.layers[i].composer for i in order]
            self._plan = (structure_version(), (composers, order, row, span))
        return self._plan[1]

    def _inputs_for_pass(self) -> dict[str, Tensor | None]:
        """`inputs`, cut to one row where one stands for all (no gradients, shared rows)."""
        inputs = self.inputs()
        if not torch.is_grad_enabled() and self.shared():
            # one condition for the whole batch (sampling): compute it once, for one row
            inputs = {k: None if v is None else v[:1] for k, v in inputs.items()}
        return inputs

    def _composed(self) -> Tensor:
        """w of every wrapper, (L, batch or 1, m) in batch order: one batched composer call
        per pass."""
        if self._w is None:
            composers = self._batch_plan()[0]
            inputs = self._inputs_for_pass()
            self._w = type(composers[0]).batched(composers, stacks=self.stacks, **inputs)
        return self._w

    def lora_weights(self, index: int) -> tuple[Tensor, Tensor]:
        """(w ⊗ 1_r, w) of wrapper `index` at the current condition, shapes (batch or 1,
        m*r) and (batch or 1, m): the factor on the rows of A x, and on the rows of E.

        In a forward pass of the injected model every composer runs at the first request,
        as one batched call for all L wrappers; outside one (a wrapper called directly)
        each runs alone.
        """
        if not self.in_pass:
            w = self.layers[index].composer(**self.inputs())
            return w.repeat_interleave(self.config.rank, dim=-1), w
        if self._weights is None:
            w = self._composed()
            ws = w.repeat_interleave(self.config.rank, dim=-1)
            self._weights = (ws.unbind(0), w.unbind(0))  # one op each, not one per wrapper
        row = self._batch_plan()[2][index]
        return self._weights[0][row], self._weights[1][row]

    def merged_weights(self, index: int) -> tuple[Tensor, Tensor | None]:
        """(W + dW, b + db) of wrapper `index` at the condition, which the batch shares. In a
        forward pass the first wrapper of a shape to ask has them formed for its whole
        group at once (`merged_group` of its class) and kept for the pass; outside one each
        wrapper forms its own."""
        layer = self.layers[index]
        if not self.in_pass:
            w = layer.composer(**self._inputs_for_pass())
            return type(layer).merged_group([layer], w[:1])[0]
        if index not in self._merged:
            _, order, _, span = self._batch_plan()
            start, stop = span[index]
            group = [self.layers[i] for i in order[start:stop]]
            w = self._composed()[start:stop, 0]  # row 0 stands for the batch
            merged = type(layer).merged_group(group, w, self.stacks)
            self._merged.update(zip(order[start:stop], merged, strict=True))
        return self._merged[index]

    def shared(self) -> bool:
        """True if every row of the condition is the same, up to float rounding (then so is
        every row of w(c), and row 0 stands for all).

        Composers act row by row, so equal rows of t, y and emb give equal rows of w; the
        inputs are checked once per condition rather than w once per wrapper.
        """
        if self._shared is None:
            inputs = self.inputs()
            self._shared = all(_rows_agree(inputs[k]) for k in ("t", "y", "emb"))
        return self._shared

    def _changed(self) -> None:
        self._w, self._weights, self._shared, self._merged = None, None, None, {}

    def begin_pass(self) -> None:
        """A forward pass of the injected model starts: nothing of an earlier pass is kept."""
        self.captured_emb = None
        self._changed()
        self.in_pass = True

    def end_pass(self) -> None:
        """The pass ended (or raised): drop its tensors, so no graph is held or reused."""
        self.captured_emb = None
        self._changed()
        self.in_pass = False

    def capture(self, emb: Tensor) -> None:
        """Store the embedding the host computed in this pass."""
        self.captured_emb = emb
        self._changed()

    def pass_state(self) -> tuple:
        """All that a forward pass has set so far (condition, captured emb, the weights
        computed, in_pass): what a recomputation under gradient checkpointing must see."""
        computed = (self._w, self._weights, self._shared, self._merged)
        return (*self.snapshot(), self.captured_emb, *computed, self.in_pass)

    def set_pass_state(self, saved: tuple) -> None:
        """Put back what `pass_state` took, as it was (nothing recomputed or checked)."""
        self.t, self.y, self.emb, self.captured_emb = saved[:4]
        self._w, self._weights, self._shared, self._merged, self.in_pass = saved[4:]

    def snapshot(self) -> tuple[Any, Any, Any]:
        """The explicit condition as stored (already checked), for `restore`."""
        return self.t, self.y, self.emb

    def restore(self, snapshot: tuple[Any, Any, Any]) -> None:
        """Put back a condition taken by `snapshot` (no second check or conversion)."""
        self.t, self.y, self.emb = snapshot
        self._changed()

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
        self._changed()

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
        self.state.capture(output[0] if isinstance(output, (tuple, list)) else output)


class PassScope:
    """Pre- (begin) and always-called post-forward (end) hook on the injected model.

    Ending the pass drops its tensors, which also keeps the model deep-copyable.
    """

    def __init__(self, state: ConditionState, begin: bool) -> None:
        self.state = state
        self.begin = begin

    def __call__(self, module: nn.Module, *args: Any) -> None:
        """Mark the start or the end of a forward pass."""
        if self.begin:
            self.state.begin_pass()
        else:
            self.state.end_pass()


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every CondLoRALayer inside `model`, by module name (the modules holding a state)."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(getattr(m, "state", None), ConditionState)
    }


class _StatesCache:
    """Each model's condition states, kept between calls: a denoiser call must not walk every
    module of its net. An entry holds while no module anywhere has registered a parameter,
    buffer or submodule since (`structure_version`: inject and remove replace modules); a
    copy of a model is a new key."""

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, model: nn.Module) -> list[ConditionState]:
        """The distinct states of the wrappers inside `model`."""
        hit = self._entries.get(model)
        if hit is not None and hit[0] == structure_version():
            return hit[1]
        unique = {id(layer.state): layer.state for layer in lora_layers(model).values()}
        states = list(unique.values())
        self._entries[model] = (structure_version(), states)
        return states


condition_states = _StatesCache()  # condition_states(model): the states of its wrappers


@contextmanager
def conditioning(model: nn.Module, t: Any = None, y: Any = None, emb: Any = None) -> Iterator[None]:
    """Within the block, every wrapper in `model` sees condition (t, y, emb); nestable.

    t: float (batch,) or scalar in [0, 1] (0 = clean, 1 = most noise); y: long (batch,) class
    indices or float (batch, num_classes) class weights; emb: (batch, emb_dim). The condition
    is replaced as a whole (an inner block does not inherit the outer t); inputs the method
    does not read are ignored. No-op for a model without LoRA.
    """
    states = condition_states(model)
    saved = [state.snapshot() for state in states]
    try:
        for state in states:
            state.set(t=t, y=y, emb=emb)
        yield
    finally:
        for state, old in zip(states, saved, strict=True):
            state.restore(old)


def checkpointed(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """torch's non-reentrant checkpoint of a block call, for conditional LoRA layers inside
    the block: its recomputation in the backward pass sees the pass state that its forward
    call saw (the condition, the captured emb, the weights composed before it), so it
    repeats the same operations. A diffusers model's `gradient_checkpointing_func`."""
    states = condition_states(block)
    saved = [state.pass_state() for state in states]
    calls = []

    def run(*inputs: Any, **options: Any) -> Any:
        if not calls:  # the forward call: the state as it is, and what the block adds to it
            calls.append(1)
            return block(*inputs, **options)
        after = [state.pass_state() for state in states]  # a recomputation: as before, then back
        for state, old in zip(states, saved, strict=True):
            state.set_pass_state(old)
        try:
            return block(*inputs, **options)
        finally:
            for state, old in zip(states, after, strict=True):
                state.set_pass_state(old)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


def set_condition(model: nn.Module, t: Any = None, y: Any = None, emb: Any = None) -> None:
    """Store condition (t, y, emb) in the model's wrappers until the next call: for a host
    loop that calls the model outside a `conditioning` block (a diffusers pipeline, with
    `condlora.lora.diffusers_callback`). A `conditioning` block inside still takes over."""
    for state in condition_states(model):
        state.set(t=t, y=y, emb=emb)


def merge(model: nn.Module, t: Any = None, y: Any = None, emb: Any = None) -> None:
    """Fold the LoRA update at one fixed condition into every wrapped base weight and bias."""
    layers = lora_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise LoRAError("LoRA is already merged; call unmerge(model) first")
    with torch.no_grad(), conditioning(model, t=t, y=y, emb=emb):
        deltas = {}
        for name, layer in layers.items():
            w = layer.composer(**layer.state.inputs())
            try:
                deltas[name] = layer.single_condition_weights(w)
            except LoRAError as err:
                raise LoRAError(f"{name}: {err} (pass a single t/y/emb to merge)") from None
        for name, layer in layers.items():
            layer.merge(deltas[name])


def unmerge(model: nn.Module) -> None:
    """Exact inverse of `merge` (the saved weights are restored, not the deltas subtracted)."""
    layers = list(lora_layers(model).values())
    if layers and not all(layer.merged for layer in layers):
        raise LoRAError("LoRA is not merged; nothing to unmerge")
    for layer in layers:
        layer.unmerge()


@contextmanager
def merged(model: nn.Module, t: Any = None, y: Any = None, emb: Any = None) -> Iterator[None]:
    """Fold the update at one condition into the weights for the block; undone exactly on exit."""
    merge(model, t=t, y=y, emb=emb)
    try:
        yield
    finally:
        unmerge(model)
