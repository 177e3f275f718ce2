"""Noise schedules: discrete DDPM betas and the continuous EDM (Karras) sigma grid."""

import math

import torch
from torch import Tensor


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear beta schedule of DDPM (Ho et al. 2020, sec. 4), float64."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


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
