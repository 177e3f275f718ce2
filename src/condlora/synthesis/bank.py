"""A bank of plain LoRAs, one per subject, on a frozen base model: per-sample LoRA in one batch.

Every target layer (a Linear or 1x1 conv, matched by name as `condlora.lora.inject` matches)
gets factors A [S, r, in] and B [S, out, r] for S subjects; sample i of a batch adds
s * B_k A_k x_i with k = subjects[i], gathered per sample. A k x k conv (any stride and
zero padding) takes a LoRA as peft's Conv2d LoRA and LyCORIS' LoCon do: A a k x k conv
in -> r with the base conv's stride and padding (stored flat, [S, r, in*k*k]), B a 1x1
conv r -> out; every sample's A is one group of a grouped conv. This is ClassLoRA's one-hot
selection computed by gathering each sample's own factors instead of a rank S*r matmul
over all subjects, so the cost per sample does not grow with the number of subjects in
the bank (at 40 subjects: half the time per fine-tuning step).

`SubjectNet` takes the place of the base denoiser's `ConditionedNet`; the subject of every
sample is set around the calls with `with subjects(denoiser, ids):`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condlora.core.errors import CondloraError
from condlora.diffusion import Denoiser
from condlora.image.build import ConditionedNet
from condlora.lora.formats import LoRAWeights, ModuleLoRA
from condlora.lora.inject import matches
from condlora.lora.layer import check_target, is_pointwise


class SubjectIds:
    """The subject index of every sample of the current batch, shared by a bank's layers."""

    def __init__(self) -> None:
        self.ids: Tensor | None = None


class SubjectLoRA(nn.Module):
    """A frozen base layer plus one rank-r LoRA per subject, picked per sample."""

    def __init__(
        self,
        base_layer: nn.Module,  # nn.Linear or nn.Conv2d, kept as is (frozen)
        num_subjects: int,  # S
        rank: int,  # r
        scale: float,  # s = alpha / r
        current: SubjectIds,  # where the batch's subject ids are read from
    ) -> None:
        super().__init__()
        self.spatial = is_spatial_conv(base_layer)
        if not self.spatial:
            check_target(type(base_layer).__name__, base_layer)
        self.base_layer = base_layer
        self.is_conv = not isinstance(base_layer, nn.Linear)
        d_out, d_in = base_layer.weight.shape[0], base_layer.weight[0].numel()
        self.rank, self.scale, self.current = rank, scale, current
        self.lora_A = nn.Parameter(torch.zeros(num_subjects, rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(num_subjects, d_out, rank))

    def forward(self, x: Tensor) -> Tensor:
        """Base output + s * B_k A_k x for each sample's subject k."""
        ids = self.current.ids
        if ids is None or len(ids) != len(x):
            raise CondloraError("set the subject of every sample first: `with subjects(...)`")
        a, b = self.lora_A[ids], self.lora_B[ids]  # (batch, r, in), (batch, out, r)
        if self.spatial:
            return self.base_layer(x) + self._conv_delta(x, a, b)
        if self.is_conv:  # (batch, in, *spatial)
            h = x.flatten(2)
        elif x.dim() == 2:  # (batch, in)
            h = x[:, :, None]
        else:  # tokens (batch, ..., in), as attention layers see them
            h = x.reshape(len(x), -1, x.shape[-1]).transpose(1, 2)
        delta = torch.bmm(b, torch.bmm(a, h)) * self.scale  # (batch, out, positions)
        if not self.is_conv and x.dim() > 2:
            return self.base_layer(x) + delta.transpose(1, 2).reshape(*x.shape[:-1], -1)
        return self.base_layer(x) + delta.reshape(len(x), -1, *x.shape[2:])

    def _conv_delta(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """s * B_k conv(x, A_k) for a k x k conv (LoCon / peft's Conv2d LoRA: A a k x k conv
        in -> r, B a 1x1 conv r -> out), every sample's A_k as one group of a grouped conv."""
        conv, n = self.base_layer, len(x)
        kernels = a.reshape(n * self.rank, *conv.weight.shape[1:])  # (batch*r, in, kh, kw)
        h = F.conv2d(
            x.reshape(1, -1, *x.shape[2:]),
            kernels,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=n,
        )  # (1, batch*r, H', W')
        delta = torch.bmm(b, h.reshape(n, self.rank, -1)) * self.scale
        return delta.reshape(n, -1, *h.shape[2:])


def is_spatial_conv(module: nn.Module) -> bool:
    """A Conv2d that is not pointwise (k x k kernel, stride or padding), groups 1, zero pads."""
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        return False
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return False
    return not is_pointwise(module)


class SubjectNet(nn.Module):
    """The backbone with its bank; forwards the class labels when the backbone takes them."""

    def __init__(self, backbone: nn.Module, pass_labels: bool, current: SubjectIds) -> None:
        super().__init__()
        self.net = backbone
        self.pass_labels = pass_labels
        self.current = current

    def forward(
        self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None
    ) -> Tensor:
        """Backbone output, each sample with its subject's LoRA."""
        return self.net(x, noise_labels, class_labels if self.pass_labels else None)


@contextmanager
def subjects(denoiser: Denoiser, ids: Tensor) -> Iterator[None]:
    """Within the block, sample i of every call to `denoiser` uses the LoRA of subject ids[i]."""
    current = denoiser.net.current
    saved, current.ids = current.ids, ids.long()
    try:
        yield
    finally:
        current.ids = saved


def base_backbone(base: Denoiser) -> tuple[nn.Module, bool]:
    """(backbone, passes class labels) of a base denoiser built by `build_denoiser`."""
    net = base.net
    if not isinstance(net, ConditionedNet):
        raise CondloraError("the base model must be an image denoiser (a `condlora train` run)")
    if net.lora:
        raise CondloraError("the base model must have no LoRA of its own (lora.method none)")
    return net.net, net.pass_labels


def bank_denoiser(
    base: Denoiser,
    num_subjects: int,
    rank: int,
    targets: list[str],
    scale: float = 1.0,
    init_seed: int = 0,
) -> Denoiser:
    """A copy of `base` (frozen) with a bank of `num_subjects` rank-`rank` LoRAs on `targets`.

    Every subject starts from the same A (drawn with `init_seed`, N(0, 1/r^2)) and B = 0: the
    bank computes the base model, and a subject's training does not depend on which others
    share its batch.
    """
    backbone, pass_labels = base_backbone(base)
    backbone = copy.deepcopy(backbone).requires_grad_(False)
    current = SubjectIds()
    modules = dict(backbone.named_modules())
    names = sorted(n for n in modules if n and any(matches(n, p) for p in targets))
    if not names:
        raise CondloraError(f"LoRA targets {list(targets)} match no module of the base model")
    generator = torch.Generator().manual_seed(init_seed)
    for name in names:
        layer = SubjectLoRA(modules[name], num_subjects, rank, scale, current)
        a = torch.randn(rank, layer.lora_A.shape[2], generator=generator) / rank
        layer.lora_A.data.copy_(a.expand_as(layer.lora_A))
        parent, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent) if parent else backbone, child, layer)
    return Denoiser(SubjectNet(backbone, pass_labels, current), base.precond, base.loss_reduction)


def bank_layers(denoiser: Denoiser) -> dict[str, SubjectLoRA]:
    """The bank's layers by module name in the backbone."""
    net = denoiser.net.net
    return {n: m for n, m in net.named_modules() if isinstance(m, SubjectLoRA)}


def subject_lora(denoiser: Denoiser, k: int) -> LoRAWeights:
    """Subject k's plain LoRA, factors shaped like the base weights (conv: [r, in, 1, 1])."""
    modules = {}
    for name, layer in bank_layers(denoiser).items():
        a = layer.lora_A[k].detach().clone()
        b = layer.lora_B[k].detach().clone()
        if layer.is_conv:
            kernel = layer.base_layer.weight.shape[1:]  # (in, kh, kw)
            extra = (1,) * (len(kernel) - 1)
            a, b = a.reshape(a.shape[0], *kernel), b.reshape(*b.shape, *extra)
        modules[name] = ModuleLoRA(a, b, layer.scale)
    return LoRAWeights(modules)


@torch.no_grad()
def load_subject(denoiser: Denoiser, k: int, weights: LoRAWeights) -> None:
    """Put a LoRA (any rank up to the bank's, any scale) into subject k's slot of the bank."""
    layers = bank_layers(denoiser)
    if set(weights.modules) != set(layers):
        differ = sorted(set(layers) ^ set(weights.modules))[:3]
        raise CondloraError(f"the LoRA's modules differ from the bank's (e.g. {differ})")
    for name, layer in layers.items():
        module = weights.modules[name]
        a, b = module.matrices()
        r = a.shape[0]
        if r > layer.rank:
            raise CondloraError(f"module {name}: rank {r} exceeds the bank's {layer.rank}")
        layer.lora_A[k].zero_()
        layer.lora_B[k].zero_()
        layer.lora_A[k, :r] = a
        layer.lora_B[k, :, :r] = b * (module.scale / layer.scale)
