"""IDDPM (Nichol & Dhariwal 2021): learned-range variance, hybrid loss, respaced sampling.

The backbone outputs 2C channels: epsilon (first C) and v (last C). The mean of
p(x_{t-1} | x_t) comes from epsilon as in DDPM; v places the log-variance between the
posterior variance beta_tilde_t and beta_t (IDDPM eq. 15). Training minimises

    L_hybrid = L_simple + lambda * L_vlb,    lambda = 0.001           (IDDPM sec. 3.1)

with the mean seen by L_vlb through a stop-gradient, so L_vlb trains the variance only.

`IDDPMDenoiser` is a `Denoiser`: its forward is the usual VE-form D(x, sigma) -> x0_hat
from the epsilon channels, so the DDPM / DDIM / Heun samplers run on it unchanged.
`sample_iddpm` is IDDPM's own ancestral sampler on a respaced chain, with the learned
variance. Internally everything here is in the VP form x_t = sqrt(abar) x0 + sqrt(1-abar) eps
with integer timesteps, as in the paper; x_VE = x_t / sqrt(abar_t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from condlora.core.errors import ConfigError
from condlora.diffusion.precond import (
    SCHEDULES,
    Denoiser,
    DiscretePrecond,
    EpsPrecond,
    alphas_cumprod,
    expand_per_sample,
    sigma_per_sample,
    standard_normal,
)

IDDPM_TIMESTEPS = 4000  # T of the paper's CIFAR-10 / ImageNet runs
LN2 = math.log(2.0)


# --- schedule and respacing --------------------------------------------------------------------


def space_timesteps(num_timesteps: int, num_steps: int) -> Tensor:
    """num_steps timesteps of 0..T-1, evenly spaced with both ends kept (IDDPM sec. 4), increasing.

    improved-diffusion's rule exactly (`space_timesteps` with one section): a float index
    advanced by a stride of (T - 1) / (num_steps - 1), rounded half to even, so exact .5
    ties fall where they fall there; one step keeps step 0, as there. More steps than T
    keep all T.
    """
    if num_steps < 1:
        raise ConfigError(f"the number of sampling steps must be >= 1, got {num_steps}")
    num_steps = min(num_steps, num_timesteps)
    stride = 1.0 if num_steps == 1 else (num_timesteps - 1) / (num_steps - 1)
    index, steps = 0.0, []
    for _ in range(num_steps):
        steps.append(round(index))
        index += stride  # accumulated, not i * stride: the rounding of the original
    return torch.tensor(steps)


class IDDPMPrecond(EpsPrecond):
    """Epsilon scalings over T discrete steps; sampling grids are IDDPM's evenly spaced steps."""

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """Sigmas at `space_timesteps(T, num_steps)`, decreasing, final 0 appended."""
        t = space_timesteps(self.num_timesteps, num_steps).flip(0)
        return torch.cat([self.sigmas[t], self.sigmas.new_zeros(1)]).float()


def iddpm_precond(
    num_timesteps: int = IDDPM_TIMESTEPS, schedule: str = "cosine", **kwargs: float
) -> IDDPMPrecond:
    """The IDDPM preconditioner: cosine schedule (IDDPM eq. 17) with T = 4000 unless told."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    try:
        betas = SCHEDULES[schedule](num_timesteps, **kwargs)
    except TypeError as e:
        raise ConfigError(f"bad option for schedule {schedule!r}: {e}") from e
    return IDDPMPrecond(alphas_cumprod(betas))


@dataclass(frozen=True)
class Chain:
    """Per-step tables of a discrete chain, given abar at its K kept steps.

    Built in float64 on the CPU; `on(device)` gives float32 copies for the hot paths.

    Step k = 0 is the least noisy. With all T steps kept this is the training chain; with
    a subset it is IDDPM's respaced chain (sec. 4): beta_k = 1 - abar_k / abar_{k-1}.
    """

    abar: Tensor  # abar at each step, (K,)
    sqrt_abar: Tensor  # sqrt(abar) and sqrt(1 - abar), tabled because 1 - abar at t = 0 is
    sqrt_1m_abar: Tensor  # ~1e-5 and would lose ~1% to cancellation if taken in float32
    betas: Tensor  # 1 - abar_k / abar_{k-1}, abar_{-1} = 1
    log_betas: Tensor  # log beta_k: the upper end of the learned range
    log_var_post: Tensor  # log beta_tilde_k; the k = 0 value (0) is clipped to k = 1's (IDDPM)
    coef_x0: Tensor  # posterior mean = coef_x0 * x0 + coef_xt * x_t (DDPM eq. 7)
    coef_xt: Tensor

    @classmethod
    def from_alphas_cumprod(cls, abar: Tensor) -> Chain:
        """Tables of the chain whose steps have cumulative alphas `abar` (increasing noise)."""
        abar = torch.as_tensor(abar, dtype=torch.float64).cpu()
        prev = torch.cat([abar.new_ones(1), abar[:-1]])
        betas = 1 - abar / prev
        var_post = betas * (1 - prev) / (1 - abar)  # beta_tilde (DDPM eq. 7)
        # beta_tilde_0 = 0: IDDPM clips log beta_tilde_0 to log beta_tilde_1; one step keeps beta
        var_post[0] = var_post[1] if len(abar) > 1 else betas[0]
        return cls(
            abar=abar,
            sqrt_abar=abar.sqrt(),
            sqrt_1m_abar=(1 - abar).sqrt(),
            betas=betas,
            log_betas=betas.log(),
            log_var_post=var_post.log(),
            coef_x0=prev.sqrt() * betas / (1 - abar),
            coef_xt=(1 - betas).sqrt() * (1 - prev) / (1 - abar),
        )

    def __len__(self) -> int:
        return len(self.abar)

    def on(self, device: torch.device | str) -> Chain:
        """The same chain with float32 tables on device (each entry rounded from float64)."""
        return Chain(**{f.name: getattr(self, f.name).float().to(device) for f in fields(self)})

    @staticmethod
    def at(table: Tensor, k: Tensor, x: Tensor) -> Tensor:
        """table[k] for (B,) step indices, float32 on x's device, shaped to broadcast with x."""
        return expand_per_sample(
            table[k.to(table.device)].to(device=x.device, dtype=torch.float32), x
        )

    def posterior(self, k: Tensor, x0: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(x_{k-1} | x_k, x0) (DDPM eq. 6-7), clipped log-variance."""
        mean = self.at(self.coef_x0, k, x_t) * x0 + self.at(self.coef_xt, k, x_t) * x_t
        return mean, self.at(self.log_var_post, k, x_t).expand_as(x_t)

    def p_mean_log_var(
        self, k: Tensor, x_t: Tensor, eps: Tensor, v: Tensor, clip_denoised: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of p(x_{k-1} | x_k) from the net's eps and v outputs."""
        x0 = x_t - self.at(self.sqrt_1m_abar, k, x_t) * eps  # DDPM eq. 4 solved for x0
        x0 = x0 / self.at(self.sqrt_abar, k, x_t)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.posterior(k, x0, x_t)
        log_var = learned_log_variance(
            v, self.at(self.log_betas, k, x_t), self.at(self.log_var_post, k, x_t)
        )
        return mean, log_var


def learned_log_variance(v: Tensor, log_beta: Tensor, log_beta_tilde: Tensor) -> Tensor:
    """IDDPM eq. 15: log Sigma = v' log beta + (1 - v') log beta_tilde with v' = (v + 1) / 2."""
    frac = (v + 1) / 2
    return frac * log_beta + (1 - frac) * log_beta_tilde


# --- the terms of L_vlb ------------------------------------------------------------------------


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per element, in nats."""
    ratio = (log_var1 - log_var2).exp()
    return 0.5 * (log_var2 - log_var1 + ratio + (mean1 - mean2) ** 2 / log_var2.exp() - 1)


def tanh_normal_cdf(z: Tensor) -> Tensor:
    """improved-diffusion's approximation of the standard normal CDF:
    0.5 * (1 + tanh(sqrt(2 / pi) * (z + 0.044715 z^3)))."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z.pow(3))))


def discretized_gaussian_nll(
    x0: Tensor, mean: Tensor, log_var: Tensor, bins: int = 256, exact: bool = False
) -> Tensor:
    """-log p(x0) per element, in nats: N(mean, e^log_var) integrated over x0's bin (DDPM eq. 13).

    x0 lies in [-1, 1] on a grid of `bins` levels (8-bit data); the two edge bins reach
    to -inf and +inf. By default the CDF is improved-diffusion's tanh approximation with
    its probabilities floored at 1e-12, so bits/dim compare with the paper's; exact=True
    integrates the normal exactly (log-CDFs, no floor needed in the tails).
    """
    half = 1.0 / (bins - 1)  # half a bin width
    inv_std = (-0.5 * log_var).exp()
    z_hi = (x0 - mean + half) * inv_std
    z_lo = (x0 - mean - half) * inv_std
    if exact:
        log_lowest = torch.special.log_ndtr(z_hi)  # lowest bin: P(X < x0 + half)
        log_highest = torch.special.log_ndtr(-z_lo)  # highest bin: P(X > x0 - half)
        log_inner = _log_ndtr_diff(z_lo, z_hi)
    else:
        cdf_hi, cdf_lo = tanh_normal_cdf(z_hi), tanh_normal_cdf(z_lo)
        log_lowest = cdf_hi.clamp_min(1e-12).log()
        log_highest = (1.0 - cdf_lo).clamp_min(1e-12).log()
        log_inner = (cdf_hi - cdf_lo).clamp_min(1e-12).log()
    log_p = torch.where(
        x0 < -1 + half, log_lowest, torch.where(x0 > 1 - half, log_highest, log_inner)
    )
    return -log_p


def _log_ndtr_diff(a: Tensor, b: Tensor) -> Tensor:
    """log(Phi(b) - Phi(a)) for a < b, from log-CDFs so that neither tail cancels to 0."""
    upper = a > 0  # in the upper tail use Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    lo, hi = torch.where(upper, -b, a), torch.where(upper, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + (-torch.expm1(log_lo - log_hi)).clamp_min(1e-12).log()


def _mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension."""
    return x.flatten(1).mean(dim=1)


# --- the objective -----------------------------------------------------------------------------


class IDDPMDenoiser(Denoiser):
    """IDDPM objective: epsilon and learned-range variance from a 2C-channel backbone.

    forward(x, sigma) -> x0_hat (VE form, from the eps channels); loss(...) is L_hybrid;
    predict(x_t, t) -> (eps, v) is the backbone in IDDPM's own terms, used by `sample_iddpm`.
    """

    def __init__(
        self,
        net: nn.Module,  # backbone with 2C output channels (eps, then v)
        precond: EpsPrecond | None = None,  # T discrete steps; default iddpm_precond()
        vlb_weight: float = 0.001,  # lambda of L_hybrid (IDDPM sec. 3.1)
        exact_decoder_nll: bool = False,  # t = 0: exact normal CDF, not improved-diffusion's tanh
    ) -> None:
        precond = iddpm_precond() if precond is None else precond
        if not isinstance(precond, EpsPrecond):
            raise ConfigError(
                f"IDDPM predicts epsilon over discrete steps: needs an EpsPrecond, "
                f"got {type(precond).__name__}"
            )
        super().__init__(net, precond)
        self.vlb_weight = vlb_weight
        self.exact_decoder_nll = exact_decoder_nll
        self.num_timesteps = precond.num_timesteps
        self.chain = Chain.from_alphas_cumprod(1 / (1 + precond.sigmas**2))  # abar_t, float64
        self._chains: dict[torch.device, Chain] = {}  # float32 copies per device

    def chain_on(self, device: torch.device) -> Chain:
        """The training chain's tables on device (cached), so lookups need no host sync."""
        if device not in self._chains:
            self._chains[device] = self.chain.on(device)
        return self._chains[device]

    def predict(self, x_t: Tensor, t: Tensor, **cond: Tensor) -> tuple[Tensor, Tensor]:
        """(eps, v) of the backbone at the VP input x_t and (B,) timestep labels, float32."""
        out = self.net(x_t, t.to(device=x_t.device, dtype=torch.float32), **cond)
        if out.shape[1] != 2 * x_t.shape[1]:
            raise ConfigError(
                f"IDDPM needs a backbone with 2 x {x_t.shape[1]} output channels (eps, v), "
                f"got {out.shape[1]}"
            )
        eps, v = out.float().chunk(2, dim=1)
        return eps, v

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        """x0_hat = x - sigma * eps in VE form (EDM Table 1, VP column); v is not used."""
        sigma = sigma_per_sample(sigma, x)
        c_in = expand_per_sample(self.precond.scalings(sigma)[2], x)
        eps, _ = self.predict(c_in * x, self.precond.noise_label(sigma), **cond)
        return x - expand_per_sample(sigma, x) * eps

    def _timesteps(
        self,
        x0: Tensor,
        generator: torch.Generator | None = None,
        sigma: Tensor | float | None = None,
        timesteps: Tensor | int | None = None,
    ) -> Tensor:
        """(B,) integer timesteps on x0's device: given, from grid sigmas, or t ~ U{0..T-1}."""
        n, T = x0.shape[0], self.num_timesteps
        if sigma is not None and timesteps is not None:
            raise ConfigError("give the IDDPM loss a sigma or a timestep, not both")
        if timesteps is not None:
            t = torch.as_tensor(timesteps, device=x0.device).long().reshape(-1).expand(n)
        elif sigma is not None:
            label = self.precond.noise_label(sigma_per_sample(sigma, x0))
            t = label.round()
            if (label - t).abs().max() > 0.01:
                raise ConfigError("the IDDPM loss needs sigmas on the T discrete training sigmas")
            t = t.long()
        else:
            gen_device = generator.device if generator is not None else x0.device
            t = torch.randint(0, T, (n,), generator=generator, device=gen_device).to(x0.device)
        if t.min() < 0 or t.max() >= T:
            raise ConfigError(f"IDDPM timesteps must lie in 0..{T - 1}")
        return t

    def vb_terms(self, x0: Tensor, x_t: Tensor, t: Tensor, eps: Tensor, v: Tensor) -> Tensor:
        """L_t per sample in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0 and
        the discretised decoder NLL -log p(x0|x_1) for t = 0 (DDPM eq. 5, IDDPM eq. 4-6)."""
        chain = self.chain_on(x_t.device)
        mean_q, log_var_q = chain.posterior(t, x0, x_t)
        mean_p, log_var_p = chain.p_mean_log_var(t, x_t, eps, v)
        kl = _mean_flat(normal_kl(mean_q, log_var_q, mean_p, log_var_p)) / LN2
        nll = discretized_gaussian_nll(x0, mean_p, log_var_p, exact=self.exact_decoder_nll)
        nll = _mean_flat(nll) / LN2
        return torch.where(t == 0, nll, kl)

    def loss_terms(
        self,
        x0: Tensor,
        generator: torch.Generator | None = None,
        sigma: Tensor | float | None = None,
        noise: Tensor | None = None,
        timesteps: Tensor | int | None = None,
        **cond: Tensor,
    ) -> dict[str, Tensor]:
        """Per-sample (B,) terms of L_hybrid: "mse" (L_simple), "vb" (L_t, bits/dim), "loss".

        x0 is in [-1, 1]; the t = 0 decoder term assumes 8-bit data (256 levels).
        """
        # 1. timestep and noise (sampled unless given), then q(x_t | x0) (DDPM eq. 4)
        t = self._timesteps(x0, generator, sigma, timesteps)
        if noise is None:
            noise = standard_normal(x0.shape, generator, x0.device)
        c = self.chain_on(x0.device)
        x_t = c.at(c.sqrt_abar, t, x0) * x0 + c.at(c.sqrt_1m_abar, t, x0) * noise
        eps, v = self.predict(x_t, t, **cond)
        # 2. L_simple: epsilon MSE, mean over pixels (DDPM eq. 14)
        mse = _mean_flat((eps - noise.float()) ** 2)
        # 3. L_t with the mean behind a stop-gradient: it trains only v (IDDPM sec. 3.1)
        vb = self.vb_terms(x0.float(), x_t.float(), t, eps.detach(), v)
        # 4. lambda * L_vlb with L_vlb = T * L_t, the one-sample estimate of sum_t L_t. This is
        #    improved-diffusion's CIFAR-10 hybrid run: its default rescale_learned_sigmas=True
        #    selects RESCALED_MSE, which multiplies L_t by T / 1000 (= 4 for T = 4000).
        loss = mse + self.vlb_weight * self.num_timesteps * vb
        return {"mse": mse, "vb": vb, "loss": loss}

    def loss(
        self,
        x0: Tensor,
        generator: torch.Generator | None = None,
        sigma: Tensor | float | None = None,
        noise: Tensor | None = None,
        timesteps: Tensor | int | None = None,
        **cond: Tensor,
    ) -> Tensor:
        """Scalar L_hybrid (IDDPM sec. 3.1), t ~ U{0..T-1} unless sigma or timesteps is given."""
        terms = self.loss_terms(x0, generator, sigma, noise, timesteps, **cond)
        return terms["loss"].mean()


# --- sampling ----------------------------------------------------------------------------------


def _grid_timesteps(precond: DiscretePrecond, sigmas: Tensor) -> Tensor:
    """Integer timesteps of sigmas that lie on the preconditioner's discrete grid."""
    label = precond.noise_label(sigmas)
    t = label.round()
    if (label - t).abs().max() > 0.05:
        raise ConfigError("sampler 'iddpm' needs sigmas on the objective's discrete grid")
    return t.long()


@torch.no_grad()
def sample_iddpm(
    denoiser: IDDPMDenoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: torch.Generator | None = None,
    progress: bool = False,
    clip_denoised: bool = True,
    **cond: Tensor,
) -> Tensor:
    """IDDPM ancestral sampling with the learned variance on the respaced chain of `sigmas`.

    sigmas (decreasing, final 0) must lie on the denoiser's T discrete sigmas: their
    timesteps t_0 < ... < t_{K-1} form the respaced chain beta_k = 1 - abar_{t_k} / abar_{t_{k-1}}
    (IDDPM sec. 4); the net sees the original t_k and its v interpolates between this
    chain's beta_k and beta_tilde_k. x is at sigmas[0] in VE form; the result is at sigma = 0.

    clip_denoised clamps x0_hat to [-1, 1], as IDDPM's image sampler does (the objective's
    data lies there). Near t = T-1 the respaced beta_k is close to 1 and the mean amplifies
    eps errors by 1 / sqrt(1 - beta_k); the clamp keeps a poorly trained net finite.
    """
    predict = getattr(denoiser, "predict", None)
    if predict is None:
        raise ConfigError("sampler 'iddpm' needs an IDDPMDenoiser (a net with learned variance)")
    s = torch.as_tensor(sigmas).detach().cpu().double()
    if len(s) < 2 or s[-1] != 0:
        raise ConfigError("sampler 'iddpm' needs at least one sigma and a final 0")
    t = _grid_timesteps(denoiser.precond, s[:-1]).flip(0)  # increasing: the kept timesteps
    if (t.diff() <= 0).any():
        raise ConfigError("sampler 'iddpm' needs strictly decreasing sigmas")
    chain = Chain.from_alphas_cumprod(1 / (1 + denoiser.precond.sigmas[t] ** 2)).on(x.device)
    x = x / math.sqrt(1 + float(s[0]) ** 2)  # VE -> VP
    for k in tqdm(range(len(chain) - 1, -1, -1), disable=not progress):
        k_b = torch.full((x.shape[0],), k, device=x.device)
        eps, v = predict(x, torch.full_like(k_b, int(t[k])), **cond)  # the original t_k
        mean, log_var = chain.p_mean_log_var(k_b, x, eps, v, clip_denoised)
        if k > 0:  # x_{k-1} ~ N(mean, Sigma)
            x = mean + (0.5 * log_var).exp() * standard_normal(x.shape, generator, x.device)
        else:  # the last step returns the mean; abar_{-1} = 1, so VP = VE
            x = mean
    return x
