"""LoRAVAE: a VAE over standardised LoRA vectors (LoRA Diffusion, arXiv 2412.02352, sec. 3).

    encoder  x (B, D) -> ResMLP -> (mean, logvar), each (B, latent)
    sample   z = mean + exp(logvar / 2) * n,  n ~ N(0, I)        (reparametrisation)
    decoder  z -> ResMLP -> x_hat (B, D)
    loss     recon + beta * kl
             recon = mean over batch and coordinates of (x_hat - x)^2
             kl    = mean over batch and latent units of KL(N(mean, var) || N(0, 1))
                   = mean of (mean^2 + var - 1 - logvar) / 2

Both terms are per-number means, so beta weighs one latent unit against one coordinate
whatever D and latent are; beta < 1 keeps reconstructions sharp (the paper's choice).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from condlora.core.config import NON_NEGATIVE, Checked, Range
from condlora.core.errors import ConfigError
from condlora.diffusion.precond import standard_normal
from condlora.nets.mlp import ResMLP

LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the encoder's logvar, so exp() stays finite


@dataclass
class VAEConfig(Checked):
    """Settings of a LoRAVAE; enough to rebuild it exactly."""

    dim: int = 0  # D, length of the LoRA vectors; 0: set from the dataset before building
    latent: int = 512  # width of the latent z
    hidden: int = 1024  # residual stream width of the encoder and of the decoder
    depth: int = 2  # residual blocks in the encoder, and as many in the decoder
    mlp_ratio: float = 2.0  # hidden width of each block's MLP = mlp_ratio * hidden
    dropout: float = 0.0  # dropout inside each block's MLP
    beta: float = 0.01  # weight of the KL term (< 1)

    CHECKS: ClassVar[dict] = {
        "dim": Range(0, 2**40),
        **{name: Range(1, 2**24) for name in ("latent", "hidden", "depth")},
        "mlp_ratio": Range(0, 1024, low_open=True),
        "dropout": Range(0, 1, high_open=True),
        "beta": NON_NEGATIVE,
    }


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar)


class LoRAVAE(nn.Module):
    """Residual-MLP VAE over (B, D) vectors; calling it returns (loss, parts) for training."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        if config.dim < 1:
            raise ConfigError("VAEConfig.dim is 0: set it from the dataset (synthesis resolve)")
        self.config = config
        block = {"mlp_ratio": config.mlp_ratio, "dropout": config.dropout}
        c = config
        self.encoder = ResMLP(c.dim, c.hidden, c.depth, 2 * c.latent, **block)
        self.decoder = ResMLP(c.latent, c.hidden, c.depth, c.dim, **block)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, D) -> (mean, logvar) of q(z | x), each (B, latent)."""
        if x.dim() != 2 or x.shape[1] != self.config.dim:
            raise ConfigError(f"VAE input must be (batch, {self.config.dim}), got {tuple(x.shape)}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, latent) -> x_hat (B, D)."""
        return self.decoder(z)

    @staticmethod
    def reparametrise(
        mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """z = mean + exp(logvar / 2) * n with n ~ N(0, I) drawn from `generator`."""
        noise = standard_normal(tuple(mean.shape), generator, mean.device).to(mean.dtype)
        return mean + (0.5 * logvar).exp() * noise

    def reconstruct(self, x: Tensor) -> Tensor:
        """Deterministic reconstruction decode(mean(x)), for evaluation."""
        return self.decode(self.encode(x)[0])

    def loss(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(recon + beta * kl, {"recon", "kl"} detached) on a batch x (B, D)."""
        mean, logvar = self.encode(x)
        x_hat = self.decode(self.reparametrise(mean, logvar, generator))
        recon = (x_hat.float() - x.float()).square().mean()
        kl = gaussian_kl(mean.float(), logvar.float()).mean()
        return recon + self.config.beta * kl, {"recon": recon.detach(), "kl": kl.detach()}

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Same as `loss`; call the module (not .loss) under DDP so gradients are synced."""
        return self.loss(x, generator)
