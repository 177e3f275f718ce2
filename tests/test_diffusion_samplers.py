"""Sampler tests against the exact denoiser of Gaussian data."""

import numpy as np
import pytest
import torch
from torch import nn

from condlora.diffusion import (
    SAMPLERS,
    Denoiser,
    DiscretePrecond,
    make_precond,
    sample,
    sample_ddim,
    sample_ddpm,
)

MU, S = 0.7, 0.4  # data ~ N(MU, S^2) per coordinate

# (objective, schedule) and steps per sampler: EDM on its Karras grid, DDPM / v on respaced
# discrete sigmas. The first-order samplers (ddpm: variance too small, ddim = Euler) need many
# steps to get the std within 5%; Heun is second order but its first step from the cosine
# schedule's sigma_max ~ 2e4 is poor with few steps (25 steps: std +46%).
SETUPS = {
    "edm": ("edm", "linear", {"ddpm": 256, "ddim": 128, "heun": 32}),
    "ddpm": ("ddpm", "linear", {"ddpm": 250, "ddim": 250, "heun": 50}),
    "v": ("v", "cosine", {"ddpm": 250, "ddim": 100, "heun": 100}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


class ExactNet(nn.Module):
    """Returns the F that makes Denoiser(net, precond) the exact denoiser of N(MU, S^2).

    It only sees the net inputs (c_in x, c_noise): sigma is recovered from the noise label,
    so this checks the preconditioner's scalings and labels end to end.
    """

    def __init__(self, precond):
        super().__init__()
        self.p = precond

    def sigma_of_label(self, c_noise):
        if isinstance(self.p, DiscretePrecond):
            grid = np.arange(self.p.num_timesteps)
            log_s = np.interp(c_noise.double().numpy(), grid, self.p.sigmas.log().numpy())
            return torch.from_numpy(log_s).exp().float()
        return (4 * c_noise).exp()

    def forward(self, x_in, c_noise, offset=None):
        sigma = self.sigma_of_label(c_noise)[:, None]
        c_skip, c_out, c_in = self.p.scalings(sigma)
        x = x_in / c_in
        mu = MU if offset is None else MU + offset[:, None]
        d = mu + S**2 / (S**2 + sigma**2) * (x - mu)  # exact E[x0 | x]
        return (d - c_skip * x) / c_out


def make(name):
    obj, sched, _ = SETUPS[name]
    p = make_precond(obj, sched)
    return Denoiser(ExactNet(p), p)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("name", list(SETUPS))
def test_exact_denoiser_samples_match_data(name, sampler):
    d = make(name)
    g = torch.Generator().manual_seed(0)
    x = sample(d, (4000, 3), sampler=sampler, steps=SETUPS[name][2][sampler], generator=g)
    assert x.shape == (4000, 3) and x.dtype == torch.float32
    mean, std = x.mean().item(), x.std().item()
    assert abs(mean - MU) < 0.05 * MU, mean
    assert abs(std - S) < (0.02 if sampler == "heun" else 0.05) * S, std


def test_ddim_eta1_is_ddpm():
    d = make("edm")
    sigmas = d.precond.sampling_sigmas(32)
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    a = sample_ddpm(d, x, sigmas, generator=torch.Generator().manual_seed(2))
    b = sample_ddim(d, x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_sample_is_seeded_and_forwards_cond():
    d = make("edm")
    y = torch.full((2000,), 2.0)
    a = sample(d, (2000, 2), "ddpm", steps=20, generator=torch.Generator().manual_seed(3))
    b = sample(d, (2000, 2), "ddpm", steps=20, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    c = sample(d, (2000, 2), "heun", steps=20, offset=y)
    assert abs(c.mean().item() - (MU + 2.0)) < 0.05


def test_samplers_take_a_plain_callable():
    # samplers only need D(x, sigma): a closure without a precond works too
    def denoise(x, sigma):
        return MU + S**2 / (S**2 + sigma**2) * (x - MU)

    sigmas = make_precond("edm").sampling_sigmas(40)
    x = torch.randn(3000, 2, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    out = SAMPLERS["heun"](denoise, x, sigmas)
    assert abs(out.mean().item() - MU) < 0.03 and abs(out.std().item() - S) < 0.02
