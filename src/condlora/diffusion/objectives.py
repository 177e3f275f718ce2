"""The denoiser: a backbone wrapped by a preconditioner, and its training loss."""

import torch
from torch import Tensor, nn

from condlora.core.errors import ConfigError
from condlora.diffusion.precond import Preconditioner, standard_normal

LOSS_REDUCTIONS = ("mean", "sum")


def sigma_per_sample(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma (float, 0-d or (B,)) as a float32 (B,) tensor on x's device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    return sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma


def expand_per_sample(c: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against x."""
    return c.reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser(nn.Module):
    """D(x, sigma, **cond) -> x0_hat: a backbone F under a preconditioner (EDM eq. 7)."""

    def __init__(
        self, net: nn.Module, precond: Preconditioner, loss_reduction: str = "mean"
    ) -> None:
        super().__init__()
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigError(
                f"unknown loss reduction {loss_reduction!r}; valid: {', '.join(LOSS_REDUCTIONS)}"
            )
        self.net = net  # backbone, called as net(x_in, noise_labels, **cond)
        self.precond = precond  # plain object: not part of the state dict
        self.loss_reduction = loss_reduction  # "mean" | "sum" (over pixels; mean over batch)

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        """EDM eq. 7: D = c_skip * x + c_out * F(c_in * x, c_noise)."""
        sigma = sigma_per_sample(sigma, x)
        c_skip, c_out, c_in = (expand_per_sample(c, x) for c in self.precond.scalings(sigma))
        F = self.net(c_in * x, self.precond.noise_label(sigma), **cond)
        return c_skip * x + c_out * F

    def loss(
        self,
        x0: Tensor,
        generator: torch.Generator | None = None,
        sigma: Tensor | float | None = None,
        noise: Tensor | None = None,
        **cond: Tensor,
    ) -> Tensor:
        """EDM eq. 8 rearranged: squared error between F and its target (x0 - c_skip x) / c_out.

        Reduced by `loss_reduction`: "mean" over every element, or "sum" over each sample's
        elements and mean over the batch (EDM's training loop: loss.sum() / batch size).
        """
        # 1. noise level and noise (sampled unless given)
        if sigma is None:
            sigma = self.precond.sample_sigma(x0.shape[0], generator=generator, device=x0.device)
        sigma = sigma_per_sample(sigma, x0)
        if noise is None:
            noise = standard_normal(x0.shape, generator, x0.device)
        # 2. noisy sample, VE form
        x = x0 + expand_per_sample(sigma, x0) * noise
        # 3. net output and the target it should regress on; lambda = 1 / c_out^2 is
        #    absorbed, so this is eps-MSE (ddpm), v-MSE (v) or EDM's weighted loss (edm)
        c_skip, c_out, c_in = (expand_per_sample(c, x0) for c in self.precond.scalings(sigma))
        F = self.net(c_in * x, self.precond.noise_label(sigma), **cond)
        target = (x0 - c_skip * x) / c_out
        err = (F.float() - target.float()).square()
        if self.loss_reduction == "sum":
            return err.flatten(1).sum(dim=1).mean()
        return err.mean()
