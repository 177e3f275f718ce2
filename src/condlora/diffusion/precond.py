"""Noise schedules (DDPM betas, the EDM sigma grid) and the preconditioners: the scalings
of EDM Table 1 for each training objective.

Everything is in the VE parametrisation x = x0 + sigma * n. A preconditioner turns
a noise level sigma into the scalings (c_skip, c_out, c_in) and the noise label
c_noise that wrap a backbone F into a denoiser D (EDM eq. 7):

    D(x, sigma) = c_skip * x + c_out * F(c_in * x, c_noise)

`Denoiser` is that wrapped backbone, with its training loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from condlora.core.errors import ConfigError

# (beta_start, beta_end) of the schedules that take them: DDPM's, and Stable Diffusion's
BETA_RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def linear_betas(
    num_timesteps: int,
    beta_start: float = BETA_RANGES["linear"][0],
    beta_end: float = BETA_RANGES["linear"][1],
) -> Tensor:
    """Linear beta schedule of DDPM (Ho et al. 2020, sec. 4), float64."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(
    num_timesteps: int,
    beta_start: float = BETA_RANGES["scaled_linear"][0],
    beta_end: float = BETA_RANGES["scaled_linear"][1],
) -> Tensor:
    """Stable Diffusion's betas, linear in sqrt(beta) (diffusers' "scaled_linear"), float64."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int, max_beta: float = 0.999, s: float = 0.008) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021 (IDDPM eq. 17), float64."""

    def abar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    # beta_t = 1 - abar(t) / abar(t - 1), clipped to max_beta to avoid the singularity at t = T
    t = [i / num_timesteps for i in range(num_timesteps + 1)]
    betas = [min(1 - abar(t[i + 1]) / abar(t[i]), max_beta) for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def alphas_cumprod(betas: Tensor) -> Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s) (DDPM sec. 2), float64."""
    return torch.cumprod(1 - betas.double(), dim=0)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM eq. 5 sigma grid from sigma_max down to sigma_min, with a final 0 (num_steps + 1)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float32)
    i = torch.arange(num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def _as_tensor(sigma: Tensor | float, device: torch.device | None = None) -> Tensor:
    """sigma as a float32 tensor (any shape) on device."""
    return torch.as_tensor(sigma, dtype=torch.float32, device=device)


def standard_normal(
    shape: tuple, generator: torch.Generator | None, device: torch.device | None
) -> Tensor:
    """Standard normal noise; drawn on the generator's device, then moved to device."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


class Preconditioner:
    """Base class: sigma -> scalings, noise label, normalised time, training and sampling sigmas."""

    sigma_min: float
    sigma_max: float

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) for sigma, same shape as sigma."""
        raise NotImplementedError

    def noise_label(self, sigma: Tensor) -> Tensor:
        """c_noise fed to the net, same shape as sigma."""
        raise NotImplementedError

    def time_of_label(self, noise_labels: Tensor) -> Tensor:
        """Normalised time in [0, 1] (0 = least noise) from the net's noise label."""
        raise NotImplementedError

    def sample_sigma(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> Tensor:
        """n training noise levels, shape (n,)."""
        raise NotImplementedError

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """Decreasing sigmas for a sampler, with a final 0 (length num_steps + 1)."""
        raise NotImplementedError


class EDMPrecond(Preconditioner):
    """EDM preconditioning (Karras et al. 2022, Table 1, "Ours" column)."""

    def __init__(
        self,
        sigma_data: float = 0.5,  # std of the data
        P_mean: float = -1.2,  # mean of ln(sigma) at training
        P_std: float = 1.2,  # std of ln(sigma) at training
        sigma_min: float = 0.002,  # smallest sampling sigma
        sigma_max: float = 80.0,  # largest sampling sigma
        rho: float = 7.0,  # sampling-grid exponent (EDM eq. 5)
    ) -> None:
        self.sigma_data = sigma_data
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.rho = rho

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """EDM Table 1: c_skip, c_out, c_in."""
        sd2, s2 = self.sigma_data**2, sigma**2
        c_skip = sd2 / (s2 + sd2)
        c_out = sigma * self.sigma_data / (s2 + sd2).sqrt()
        c_in = 1 / (s2 + sd2).sqrt()
        return c_skip, c_out, c_in

    def noise_label(self, sigma: Tensor) -> Tensor:
        """EDM Table 1: c_noise = ln(sigma) / 4."""
        return _as_tensor(sigma).log() / 4

    def time_of_label(self, noise_labels: Tensor) -> Tensor:
        """ln(sigma) = 4 c_noise, normalised over [ln sigma_min, ln sigma_max] and clamped."""
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return ((4 * noise_labels - lo) / (hi - lo)).clamp(0, 1)

    def sample_sigma(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> Tensor:
        """EDM Table 1: ln(sigma) ~ N(P_mean, P_std^2)."""
        return (standard_normal((n,), generator, device) * self.P_std + self.P_mean).exp()

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """EDM eq. 5 with rho = 7, final 0 appended."""
        return karras_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho)


class DiscretePrecond(Preconditioner):
    """Shared part of the DDPM-style objectives on T discrete timesteps (abar given)."""

    def __init__(self, alphas_cumprod: Tensor) -> None:
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        # VP -> VE: x_t / sqrt(abar) = x0 + sigma_t * eps with sigma_t = sqrt((1 - abar) / abar)
        self.sigmas = ((1 - abar) / abar).sqrt()  # increasing in t, float64 on CPU
        self.num_timesteps = len(self.sigmas)
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])
        self._log_sigmas: dict[torch.device, Tensor] = {}

    def _log_table(self, device: torch.device) -> Tensor:
        """log sigma_t on device (float64 where supported), cached per device."""
        if device not in self._log_sigmas:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._log_sigmas[device] = self.sigmas.log().to(device=device, dtype=dtype)
        return self._log_sigmas[device]

    def noise_label(self, sigma: Tensor) -> Tensor:
        """Fractional timestep in [0, T-1]: log sigma interpolated over the discrete log sigmas."""
        sigma = torch.as_tensor(sigma)
        table = self._log_table(sigma.device)
        log_s = sigma.to(table.dtype).log().clamp(table[0], table[-1])
        hi = torch.searchsorted(table, log_s).clamp(1, self.num_timesteps - 1)
        lo = hi - 1
        w = (log_s - table[lo]) / (table[hi] - table[lo])
        return (lo + w).float()

    def time_of_label(self, noise_labels: Tensor) -> Tensor:
        """t / (T - 1)."""
        return (noise_labels / (self.num_timesteps - 1)).clamp(0, 1)

    def sample_sigma(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> Tensor:
        """t ~ U{0, ..., T-1} (DDPM Algorithm 1), returned as sigma_t."""
        gen_device = generator.device if generator is not None else None
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=gen_device)
        return self.sigmas[t.cpu()].float().to(device)

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """num_steps evenly spaced discrete sigmas (incl. both ends), decreasing, final 0."""
        num_steps = max(1, min(num_steps, self.num_timesteps))
        idx = torch.linspace(self.num_timesteps - 1, 0, num_steps, dtype=torch.float64).round()
        sigmas = self.sigmas[idx.long()]
        return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


class EpsPrecond(DiscretePrecond):
    """DDPM epsilon prediction (Ho et al. 2020), written as EDM Table 1 "VP" scalings."""

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x0 = x - sigma * eps, and the net sees the VP input x / sqrt(sigma^2 + 1)."""
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        return c_skip, c_out, c_in


class VPrecond(DiscretePrecond):
    """v-prediction (Salimans & Ho 2022, sec. 4): v = sqrt(abar) eps - sqrt(1 - abar) x0."""

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x0 = sqrt(abar) x_vp - sqrt(1 - abar) v in VE terms."""
        s2p1 = sigma**2 + 1
        c_skip = 1 / s2p1
        c_out = -sigma / s2p1.sqrt()
        c_in = 1 / s2p1.sqrt()
        return c_skip, c_out, c_in


class X0Precond(DiscretePrecond):
    """x0-prediction: the net's output is the clean sample itself (c_skip = 0, c_out = 1)."""

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """D = F(x_vp, t): no skip path; the net sees the VP input x / sqrt(sigma^2 + 1)."""
        c_skip = torch.zeros_like(sigma)
        c_out = torch.ones_like(sigma)
        c_in = 1 / (sigma**2 + 1).sqrt()
        return c_skip, c_out, c_in


OBJECTIVES = {"ddpm": EpsPrecond, "edm": EDMPrecond, "v": VPrecond, "x0": X0Precond}
SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas, "scaled_linear": scaled_linear_betas}


def make_precond(
    objective: str, schedule: str = "linear", num_timesteps: int = 1000, **kwargs: float
) -> Preconditioner:
    """Build a preconditioner by name; kwargs go to EDMPrecond or to the beta schedule."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    try:
        if objective == "edm":
            return EDMPrecond(**kwargs)
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        betas = SCHEDULES[schedule](num_timesteps, **kwargs)
    except TypeError as e:
        raise ConfigError(f"bad option for objective {objective!r}: {e}") from e
    return OBJECTIVES[objective](alphas_cumprod(betas))


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
