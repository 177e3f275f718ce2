"""condlora.diffusion: schedules, preconditioners (objectives) and samplers, all in VE form."""

from condlora.diffusion.guidance import GuidedDenoiser, one_hot_labels
from condlora.diffusion.objectives import Denoiser
from condlora.diffusion.precond import (
    DiscretePrecond,
    EDMPrecond,
    EpsPrecond,
    Preconditioner,
    VPrecond,
    make_precond,
)
from condlora.diffusion.samplers import SAMPLERS, sample, sample_ddim, sample_ddpm, sample_heun
from condlora.diffusion.schedules import alphas_cumprod, cosine_betas, karras_sigmas, linear_betas

__all__ = [
    "SAMPLERS",
    "Denoiser",
    "DiscretePrecond",
    "EDMPrecond",
    "EpsPrecond",
    "GuidedDenoiser",
    "Preconditioner",
    "VPrecond",
    "alphas_cumprod",
    "cosine_betas",
    "karras_sigmas",
    "linear_betas",
    "make_precond",
    "one_hot_labels",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_heun",
]
