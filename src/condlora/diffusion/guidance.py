"""Classifier-free guidance (Ho & Salimans 2022) around any class-conditional denoiser."""

import torch
from torch import Tensor, nn

from condlora.core.labels import class_weights
from condlora.diffusion.objectives import Denoiser


class GuidedDenoiser(nn.Module):
    """D_g = D(x, null) + g * (D(x, y) - D(x, null)); the null class is an all-zero weight row."""

    def __init__(self, denoiser: Denoiser, scale: float, num_classes: int) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.precond = denoiser.precond  # samplers read the sigma grid from here
        self.scale = scale
        self.num_classes = num_classes

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor) -> Tensor:
        """Guided x0 estimate: the conditional and unconditional halves run as one batch."""
        y = class_weights(class_labels, self.num_classes).to(x.device)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        both = self.denoiser(
            torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=torch.cat([y, 0 * y])
        )
        cond, uncond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)


class EmbeddingGuidedDenoiser(nn.Module):
    """D_g = D(x, null) + g * (D(x, e) - D(x, null)) for nets that take `embedding=`, `drop=`.

    The null condition is the net's own (learned) null embedding, reached by dropping every
    row (`drop` all True), as rows were dropped in training (condlora.nets.VectorDenoiser).
    """

    def __init__(self, denoiser: Denoiser, scale: float) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.precond = denoiser.precond  # samplers read the sigma grid from here
        self.scale = scale

    def forward(self, x: Tensor, sigma: Tensor | float, embedding: Tensor) -> Tensor:
        """Guided x0 estimate: the conditional and unconditional halves run as one batch."""
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(n)
        drop = torch.arange(2 * n, device=x.device) >= n  # second half: the null condition
        both = self.denoiser(
            torch.cat([x, x]),
            torch.cat([sigma, sigma]),
            embedding=torch.cat([embedding, embedding]),
            drop=drop,
        )
        cond, uncond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)
