"""Samplers: each takes a denoiser D(x, sigma, **cond), x at sigmas[0] and a decreasing sigma
sequence ending in 0, and returns x at sigma = 0. All work in the VE form x = x0 + sigma * n."""

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from condlora.core.errors import ConfigError
from condlora.core.labels import class_weights
from condlora.diffusion.iddpm import sample_iddpm
from condlora.diffusion.precond import Denoiser, standard_normal


def _floats(sigmas: Tensor) -> list[float]:
    """The sigma sequence as Python floats (step coefficients are computed in float64)."""
    return torch.as_tensor(sigmas).detach().cpu().double().tolist()


@torch.no_grad()
def sample_ddpm(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **cond: Tensor,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020): draw from the posterior of DDPM eq. 6-7."""
    s = _floats(sigmas)
    for i in tqdm(range(len(s) - 1), disable=not progress):
        x0 = denoiser(x, s[i], **cond)
        # VE -> VP: abar = 1 / (1 + sigma^2), x_vp = sqrt(abar) * x_ve
        abar_t, abar_s = 1 / (1 + s[i] ** 2), 1 / (1 + s[i + 1] ** 2)
        alpha = abar_t / abar_s  # one step of the respaced chain
        beta = 1 - alpha
        x_t = x * math.sqrt(abar_t)
        # posterior mean mu_tilde and variance beta_tilde (DDPM eq. 7)
        c_x0 = math.sqrt(abar_s) * beta / (1 - abar_t)
        c_xt = math.sqrt(alpha) * (1 - abar_s) / (1 - abar_t)
        var = beta * (1 - abar_s) / (1 - abar_t)
        x_s = c_x0 * x0 + c_xt * x_t
        # no noise on the last step to sigma = 0
        if s[i + 1] > 0:
            x_s = x_s + math.sqrt(var) * standard_normal(x.shape, generator, x.device)
        # VP -> VE
        x = x_s / math.sqrt(abar_s)
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **cond: Tensor,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) in VE form; eta = 0 is Euler, eta = 1 is DDPM ancestral."""
    s = _floats(sigmas)
    for i in tqdm(range(len(s) - 1), disable=not progress):
        x0 = denoiser(x, s[i], **cond)
        eps = (x - x0) / s[i]
        # DDIM eq. 16 noise std, VE form: sigma_s^2 (sigma_t^2 - sigma_s^2) / sigma_t^2
        std = eta * s[i + 1] * math.sqrt(max(s[i] ** 2 - s[i + 1] ** 2, 0.0)) / s[i]
        # x_s = x0_hat + direction pointing to x_t + random noise (DDIM eq. 12)
        x = x0 + math.sqrt(max(s[i + 1] ** 2 - std**2, 0.0)) * eps
        if std > 0:
            x = x + std * standard_normal(x.shape, generator, x.device)
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **cond: Tensor,
) -> Tensor:
    """EDM Algorithm 1: deterministic 2nd-order Heun; generator is unused."""
    s = _floats(sigmas)
    for i in tqdm(range(len(s) - 1), disable=not progress):
        # Euler step from sigma_i to sigma_{i+1} (Alg. 1, lines 4-5)
        d = (x - denoiser(x, s[i], **cond)) / s[i]
        x_next = x + (s[i + 1] - s[i]) * d
        # 2nd-order correction unless stepping to sigma = 0 (Alg. 1, lines 6-8)
        if s[i + 1] > 0:
            d_next = (x_next - denoiser(x_next, s[i + 1], **cond)) / s[i + 1]
            x_next = x + (s[i + 1] - s[i]) * (d + d_next) / 2
        x = x_next
    return x


# samplers of any denoiser D(x, sigma), and those that need the net's learned variance too
SAMPLERS: dict[str, Callable] = {"ddpm": sample_ddpm, "ddim": sample_ddim, "heun": sample_heun}
LEARNED_VARIANCE_SAMPLERS: dict[str, Callable] = {"iddpm": sample_iddpm}


def sample(
    denoiser: Denoiser,
    shape: tuple,
    sampler: str = "heun",
    steps: int = 18,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    noise: Tensor | None = None,
    **cond: Tensor,
) -> Tensor:
    """Draw samples: start from N(0, sigma_max^2) on the preconditioner's grid and run a sampler.

    `noise` (shape `shape`, N(0, 1)) is the starting noise; drawn from `generator` if None.
    """
    samplers = SAMPLERS | LEARNED_VARIANCE_SAMPLERS
    if sampler not in samplers:
        raise ConfigError(f"unknown sampler {sampler!r}; valid: {', '.join(samplers)}")
    sigmas = denoiser.precond.sampling_sigmas(steps)
    if noise is None:
        noise = standard_normal(tuple(shape), generator, device)
    x = noise.to(device) * float(sigmas[0])
    return samplers[sampler](denoiser, x, sigmas, generator=generator, progress=progress, **cond)


class GuidedDenoiser(nn.Module):
    """D_g = D(x, null) + g * (D(x, y) - D(x, null)); the null class is an all-zero weight row,
    or, for labels that are indices into a table (`null_index` given, a text model's captions),
    that index (its empty prompt)."""

    def __init__(
        self, denoiser: Denoiser, scale: float, num_classes: int, null_index: int | None = None
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.precond = denoiser.precond  # samplers read the sigma grid from here
        self.scale = scale
        self.num_classes = num_classes
        self.null_index = null_index

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor) -> Tensor:
        """Guided x0 estimate: the conditional and unconditional halves run as one batch."""
        if self.null_index is None:
            y = class_weights(class_labels, self.num_classes).to(x.device)
            null = 0 * y
        else:
            y = class_labels.to(x.device)
            null = torch.full_like(y, self.null_index)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        both = self.denoiser(
            torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=torch.cat([y, null])
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
