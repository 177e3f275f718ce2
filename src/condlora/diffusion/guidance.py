"""Classifier-free guidance (Ho & Salimans 2022) around any class-conditional denoiser."""

import torch
from torch import Tensor, nn

from condlora.diffusion.objectives import Denoiser


def one_hot_labels(labels: Tensor, num_classes: int) -> Tensor:
    """Long labels (B,) -> float class weights (B, K); float weights pass unchanged."""
    if labels.is_floating_point():
        return labels
    return torch.nn.functional.one_hot(labels.long(), num_classes).float()


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
        y = one_hot_labels(class_labels, self.num_classes)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        both = self.denoiser(
            torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=torch.cat([y, 0 * y])
        )
        cond, uncond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)
