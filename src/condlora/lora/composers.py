"""Composers: map a condition (t, y, emb) to the basis weights w(c) of shape (batch, m).

Every composer has the same call, `forward(t=None, y=None, emb=None) -> (batch, m)`, reads
only the inputs it needs, and exposes `num_weights` (= m).

The composers of all L wrapped layers of one injection are evaluated together, once per
forward pass: `batched(composers, t, y, emb) -> (L, batch, m)` stacks their parameters and
runs each step as one batched op (a UC-LoRA MLP layer is one matmul for all L layers), so
the cost does not grow with a Python loop over layers. `forward` is `batched` of one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condlora.core import labels
from condlora.core.errors import CondloraError, LoRAError
from condlora.core.structure import structure_version
from condlora.lora.config import LoRAConfig, mlp_group_count


def _missing(method: str, arg: str, extra: str = "") -> LoRAError:
    return LoRAError(
        f"{method} needs {arg}: wrap the call in `with conditioning(model, {arg}=...)`{extra}"
    )


def time_input(t: Tensor | float) -> Tensor:
    """Normalised diffusion time as a float tensor of shape (batch,), clamped to [0, 1]."""
    t = torch.as_tensor(t)
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() > 1:
        raise LoRAError(f"t must be a scalar or of shape (batch,), got shape {tuple(t.shape)}")
    return t.reshape(-1).float().clamp(0.0, 1.0)


def class_weights(y: Tensor | int, num_classes: int) -> Tensor:
    """`condlora.core.labels.class_weights`, with a bad shape reported as a LoRAError."""
    try:
        return labels.class_weights(y, num_classes)
    except CondloraError as err:
        raise LoRAError(str(err)) from None


def check_class_range(y: Tensor | int, num_classes: int) -> None:
    """Raise LoRAError if integer class indices fall outside [0, num_classes)."""
    y = torch.as_tensor(y)
    if not y.is_floating_point() and y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise LoRAError(
            f"class index out of range [0, {num_classes}): got min {int(y.min())}, "
            f"max {int(y.max())}"
        )


def counting_parameters() -> bool:
    """Is the model being built on the meta device, to count its parameters? Then
    initialisers draw nothing: torch's first random or arange op there costs seconds of
    imports (`condlora.image.checks.check_model_size` runs before every build)."""
    return torch.empty(()).is_meta


def hat_table(num_rows: int, num_bases: int) -> Tensor:
    """(T, m) table, row k = linear interpolation between one-hot rows at m evenly spaced knots.

    Basis j is a hat function that is 1 at knot row c_j and 0 at the neighbouring knots, so
    every row sums to 1 and neighbouring rows are nearly equal.
    """
    if num_bases == 1 or num_rows == 1:
        return torch.full((num_rows, num_bases), 1.0 / num_bases)
    if num_rows < num_bases:
        raise LoRAError(f"TimeLoRA needs num_time_rows >= num_bases, got {num_rows} < {num_bases}")
    if counting_parameters():
        return torch.empty(num_rows, num_bases)
    knots = torch.linspace(0, num_rows - 1, num_bases, dtype=torch.float64).round()
    rows = torch.arange(num_rows, dtype=torch.float64)
    left = (torch.searchsorted(knots, rows, right=True) - 1).clamp(0, num_bases - 2)
    frac = (rows - knots[left]) / (knots[left + 1] - knots[left])
    table = torch.zeros(num_rows, num_bases, dtype=torch.float64)
    table[torch.arange(num_rows), left] = 1 - frac
    table[torch.arange(num_rows), left + 1] = frac
    return table.float()


def _stack(tensors: list[Tensor], cat: bool) -> Tensor:
    """torch.stack (or torch.cat), without a copy for a single tensor."""
    if len(tensors) == 1:
        return tensors[0] if cat else tensors[0].unsqueeze(0)
    return torch.cat(tensors) if cat else torch.stack(tensors)


def stack(items: list, name: str, cat: bool = False) -> Tensor:
    """Parameter `name` (an attribute path such as "mlp.0.weight") of every item, stacked
    along a new first dim (or concatenated along the first with `cat`)."""
    return _stack(list(map(attrgetter(name), items)), cat)


class ParameterStacks:
    """`stack`, kept between calls: the list of each parameter while no module's structure
    changes (a walk of the modules costs as much as a small op per item), and without
    gradients the stack itself until one of the parameters changes (its version counter or
    its storage), so sampling neither walks nor copies the layers' parameters at every
    denoiser call. With gradients it stacks anew."""

    def __init__(self) -> None:
        self._cache: dict[tuple, list] = {}

    def __call__(self, items: list, name: str, cat: bool = False) -> Tensor:
        """stack(items, name, cat), from the cache where it is still valid."""
        key = (name, cat, *map(id, items))
        hit = self._cache.get(key)
        if hit is None or hit[0] != structure_version():
            tensors = list(map(attrgetter(name), items))  # the entry holds the items: ids stay
            hit = self._cache[key] = [structure_version(), tuple(items), tensors, None, None]
        tensors = hit[2]
        if torch.is_grad_enabled():
            return _stack(tensors, cat)
        stamp = ([t._version for t in tensors], [t.data_ptr() for t in tensors])
        if hit[3] != stamp:
            hit[3], hit[4] = stamp, _stack(tensors, cat)
        return hit[4]

    def __getstate__(self) -> dict:
        """Copies and pickles start empty (their parameters are other tensors)."""
        return {"_cache": {}}


class Composer(nn.Module):
    """A composer's single call, as `batched` of itself; subclasses define `batched`."""

    num_weights: int

    @staticmethod
    def batched(
        composers: list,
        t: object = None,
        y: object = None,
        emb: object = None,
        stacks: Callable = stack,
    ) -> Tensor:
        """(L, batch, m): the basis weights of L composers of this class at one condition."""
        raise NotImplementedError

    def forward(self, t: object = None, y: object = None, emb: object = None) -> Tensor:
        """Basis weights (batch, m) at condition (t, y, emb)."""
        return self.batched([self], t=t, y=y, emb=emb)[0]


class TimeComposer(Composer):
    """TimeLoRA: w(t) = Omega[t*(T-1)], linearly interpolated between neighbouring rows."""

    def __init__(self, num_rows: int, num_bases: int) -> None:
        super().__init__()
        self.num_weights = num_bases
        self.omega = nn.Parameter(hat_table(num_rows, num_bases))  # (T, m)

    @staticmethod
    def batched(
        composers: list,
        t: object = None,
        y: object = None,
        emb: object = None,
        stacks: Callable = stack,
    ) -> Tensor:
        """Interpolated table rows for normalised times t in [0, 1], every table at once."""
        if t is None:
            raise _missing("TimeLoRA", "t")
        omega = stacks(composers, "omega")  # (L, T, m)
        rows = omega.shape[1]
        pos = time_input(t).to(omega.device) * (rows - 1)
        # Snap positions within 1e-3 of an integer, so t = k/(T-1) in float32 hits row k exactly.
        near = pos.round()
        pos = torch.where((pos - near).abs() < 1e-3, near, pos)
        i0 = pos.floor().long().clamp(0, max(rows - 2, 0))
        i1 = (i0 + 1).clamp(max=rows - 1)
        frac = (pos - i0).clamp(0, 1)[:, None].to(omega.dtype)
        return omega[:, i0] * (1 - frac) + omega[:, i1] * frac


class ClassComposer(Composer):
    """ClassLoRA: w = class weights (one-hot), or weights @ C with learned C (compositional)."""

    def __init__(self, num_classes: int, class_bases: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_weights = class_bases or num_classes
        self.mix = None
        if class_bases:
            # rows of norm ~1: every class starts with a comparable, generic mixture
            shape = (num_classes, class_bases)
            counting = counting_parameters()
            mix = torch.empty(shape) if counting else torch.randn(shape) / math.sqrt(class_bases)
            self.mix = nn.Parameter(mix)

    @staticmethod
    def batched(
        composers: list,
        t: object = None,
        y: object = None,
        emb: object = None,
        stacks: Callable = stack,
    ) -> Tensor:
        """Basis weights for class indices (batch,) or class weights (batch, num_classes)."""
        if y is None:
            raise _missing("ClassLoRA", "y")
        w = class_weights(y, composers[0].num_classes)
        if composers[0].mix is None:  # one-hot selection: the same weights for every layer
            return w.expand(len(composers), -1, -1)
        mix = stacks(composers, "mix")  # (L, num_classes, class_bases)
        return w.to(mix.device, mix.dtype) @ mix


def _paper_linear(width_in: int, width_out: int) -> nn.Linear:
    """Linear layer initialised as the paper's code (EDM's Linear, mode "kaiming_normal"):
    weight ~ N(0, 1 / fan_in), i.e. Kaiming-normal with gain 1, and a zero bias."""
    layer = nn.Linear(width_in, width_out)
    if counting_parameters():
        return layer
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="linear")
    nn.init.zeros_(layer.bias)
    return layer


class UCComposer(Composer):
    """UC-LoRA: MLP on the host's condition embedding, (Linear-GroupNorm-SiLU)* then Linear.

    As the paper's code builds it: every Linear (the last one, to the m bases, included)
    starts Kaiming-normal with zero bias; `groups` is an int or "auto" (`mlp_group_count`).
    Every layer's MLP reads the same embedding, so `batched` runs the L MLPs as one: the
    first Linear as one matmul with the L weights stacked along the output, the later ones
    as one batched matmul (L, batch, width) @ (L, width, width').
    """

    def __init__(self, emb_dim: int, widths: list[int], groups: int | str, num_bases: int) -> None:
        super().__init__()
        self.emb_dim = emb_dim
        self.num_weights = num_bases
        layers: list[nn.Module] = []
        width_in = emb_dim
        for width in widths:
            norm = nn.GroupNorm(mlp_group_count(groups, width), width)
            layers += [_paper_linear(width_in, width), norm, nn.SiLU()]
            width_in = width
        layers.append(_paper_linear(width_in, num_bases))
        self.mlp = nn.Sequential(*layers)

    @staticmethod
    def batched(
        composers: list,
        t: object = None,
        y: object = None,
        emb: object = None,
        stacks: Callable = stack,
    ) -> Tensor:
        """MLP outputs (L, batch, m) for an embedding of shape (batch, emb_dim)."""
        emb_dim = composers[0].emb_dim
        if emb is None:
            hint = " or set LoRAConfig.emb_module so the host's embedding is captured"
            raise _missing("UC-LoRA", "emb", hint)
        if emb.dim() != 2 or emb.shape[1] != emb_dim:
            raise LoRAError(
                f"UC-LoRA emb must have shape (batch, {emb_dim}), got {tuple(emb.shape)}"
            )
        mlp = list(composers[0].mlp)  # the depth, the same in every layer's MLP
        first = mlp[0].weight
        # first Linear: the L weights stacked along the output, one matmul -> (batch, L*width)
        h = F.linear(
            emb.to(first.device, first.dtype),
            stacks(composers, "mlp.0.weight", cat=True),
            stacks(composers, "mlp.0.bias", cat=True),
        )
        h = h.view(emb.shape[0], len(composers), -1).transpose(0, 1)  # (L, batch, width)
        for i, module in enumerate(mlp[1:], start=1):
            if isinstance(module, nn.SiLU):
                h = F.silu(h)
                continue
            weight, bias = stacks(composers, f"mlp.{i}.weight"), stacks(composers, f"mlp.{i}.bias")
            if isinstance(module, nn.GroupNorm):  # each layer's norm on its slice, at once
                num, batch, width = h.shape
                normed = F.group_norm(
                    h.reshape(num * batch, width), module.num_groups, eps=module.eps
                )
                h = torch.addcmul(
                    bias.unsqueeze(1), normed.view(num, batch, width), weight.unsqueeze(1)
                )
            else:  # Linear: (L, batch, width) @ (L, width, width') + bias, one batched matmul
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        return h


class ConcatComposer(Composer):
    """Several banks fused into one: w = cat(w_1, w_2, ...), batch 1 broadcast to batch B."""

    def __init__(self, **parts: Composer) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.num_weights = sum(p.num_weights for p in parts.values())

    @staticmethod
    def batched(
        composers: list,
        t: object = None,
        y: object = None,
        emb: object = None,
        stacks: Callable = stack,
    ) -> Tensor:
        """Concatenated basis weights of every part."""
        ws = []
        for key, part in composers[0].parts.items():
            same_parts = [c.parts[key] for c in composers]
            ws.append(type(part).batched(same_parts, t=t, y=y, emb=emb, stacks=stacks))
        batch = max(w.shape[1] for w in ws)
        if any(w.shape[1] not in (1, batch) for w in ws):
            sizes = [w.shape[1] for w in ws]
            raise LoRAError(f"condition batch sizes {sizes} do not broadcast")
        return torch.cat([w.to(ws[0].device).expand(-1, batch, -1) for w in ws], dim=2)


def build_composer(config: LoRAConfig, emb_dim: int | None = None) -> Composer:
    """A fresh composer for one wrapped layer, as the config's method asks."""
    if config.method == "time":
        return TimeComposer(config.num_time_rows, config.num_bases)
    if config.method == "class":
        return ClassComposer(config.num_classes, config.class_bases)
    if config.method == "uc":
        if emb_dim is None:
            raise LoRAError("UC-LoRA needs emb_dim (or emb_module to infer it from)")
        return UCComposer(emb_dim, config.mlp_widths, config.mlp_groups, config.num_bases)
    if config.method == "time+class":
        return ConcatComposer(
            time=TimeComposer(config.num_time_rows, config.num_bases),
            cls=ClassComposer(config.num_classes, config.class_bases),
        )
    raise LoRAError(f"method {config.method!r} has no composer")
