"""condlora.diffusion: schedules, preconditioners (objectives) and samplers, all in VE form."""

from condlora.diffusion.iddpm import (
    IDDPMDenoiser,
    IDDPMPrecond,
    iddpm_precond,
    sample_iddpm,
    space_timesteps,
)
from condlora.diffusion.objectives import Denoiser
from condlora.diffusion.precond import (
    DiscretePrecond,
    EDMPrecond,
    EpsPrecond,
    Preconditioner,
    VPrecond,
    X0Precond,
    alphas_cumprod,
    cosine_betas,
    karras_sigmas,
    linear_betas,
    make_precond,
)
from condlora.diffusion.samplers import (
    LEARNED_VARIANCE_SAMPLERS,
    SAMPLERS,
    EmbeddingGuidedDenoiser,
    GuidedDenoiser,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_heun,
)

__all__ = [
    "LEARNED_VARIANCE_SAMPLERS",
    "SAMPLERS",
    "Denoiser",
    "DiscretePrecond",
    "EDMPrecond",
    "EmbeddingGuidedDenoiser",
    "EpsPrecond",
    "GuidedDenoiser",
    "IDDPMDenoiser",
    "IDDPMPrecond",
    "Preconditioner",
    "VPrecond",
    "X0Precond",
    "alphas_cumprod",
    "cosine_betas",
    "iddpm_precond",
    "karras_sigmas",
    "linear_betas",
    "make_precond",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_heun",
    "sample_iddpm",
    "space_timesteps",
]
