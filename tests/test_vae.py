"""LoRAVAE: KL against the closed form, the loss and its parts, shapes, reparametrisation,
and a tiny VAE that fits random low-rank vectors."""

import math

import pytest
import torch

from condlora.core.errors import ConfigError
from condlora.nets import ResMLPBlock
from condlora.synthesis.config import VAEConfig
from condlora.synthesis.model import LoRAVAE, gaussian_kl

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    return LoRAVAE(VAEConfig(**({"dim": 12, "latent": 3, "hidden": 16, "depth": 1} | kw)))


def test_kl_matches_closed_form():
    mean = torch.tensor([0.0, 1.5, -0.3, 2.0])
    std = torch.tensor([1.0, 0.2, 3.0, 0.7])
    # KL(N(m, s^2) || N(0, 1)) = ln(1 / s) + (s^2 + m^2) / 2 - 1/2
    expected = [
        math.log(1 / s) + (s * s + m * m) / 2 - 0.5
        for m, s in zip(mean.tolist(), std.tolist(), strict=True)
    ]
    kl = gaussian_kl(mean, 2 * std.log())
    torch.testing.assert_close(kl, torch.tensor(expected))
    assert kl[0] == 0  # the prior itself
    # and against torch's own implementation
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std), torch.distributions.Normal(0.0, 1.0)
    )
    torch.testing.assert_close(kl, ref)


def test_shapes_and_shared_block():
    vae = tiny()
    x = torch.randn(5, 12)
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (5, 3)
    assert vae.decode(mean).shape == (5, 12) and vae.reconstruct(x).shape == (5, 12)
    blocks = list(vae.encoder.blocks) + list(vae.decoder.blocks)
    assert blocks and all(type(b) is ResMLPBlock for b in blocks)  # the prior's block class
    with pytest.raises(ConfigError, match=r"VAE input must be \(batch, 12\)"):
        vae.encode(torch.randn(5, 11))
    with pytest.raises(ConfigError, match="VAEConfig.dim is 0: set it from the dataset"):
        LoRAVAE(VAEConfig())
    with pytest.raises(ConfigError, match=r"^VAEConfig.beta must be >= 0, got -0.1"):
        VAEConfig(dim=4, beta=-0.1)


def test_loss_and_parts_match_formula():
    vae = tiny(beta=0.3)
    x = torch.randn(6, 12)
    loss, parts = vae.loss(x, generator=torch.Generator().manual_seed(7))
    # written out: z = mean + exp(logvar / 2) n with the same noise draw
    mean, logvar = vae.encode(x)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    x_hat = vae.decode(mean + torch.exp(logvar / 2) * noise)
    recon = ((x_hat - x) ** 2).sum() / x.numel()
    kl = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).sum() / mean.numel()
    torch.testing.assert_close(parts["recon"], recon.detach())
    torch.testing.assert_close(parts["kl"], kl.detach())
    torch.testing.assert_close(loss, recon + 0.3 * kl)
    assert loss.requires_grad and not parts["recon"].requires_grad
    # calling the module is the same loss (DDP sees forward)
    again, _ = vae(x, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(again, loss)


def test_reparametrisation():
    mean = torch.tensor([[1.0, -2.0, 0.5]]).expand(20000, -1)
    logvar = torch.tensor([[0.0, math.log(0.25), math.log(4.0)]]).expand(20000, -1)
    z = LoRAVAE.reparametrise(mean, logvar, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(0), mean[0], atol=0.05, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 0.5, 2.0]), atol=0.04, rtol=0)
    z_again = LoRAVAE.reparametrise(mean, logvar, torch.Generator().manual_seed(0))
    assert torch.equal(z, z_again)  # the generator fixes the draw
    # gradients reach mean and logvar through the sample
    m = torch.zeros(2, 3, requires_grad=True)
    lv = torch.zeros(2, 3, requires_grad=True)
    LoRAVAE.reparametrise(m, lv).sum().backward()
    assert torch.equal(m.grad, torch.ones(2, 3)) and lv.grad.abs().sum() > 0


def test_tiny_vae_fits_low_rank_vectors():
    g = torch.Generator().manual_seed(0)
    n, dim, rank = 256, 32, 3
    data = torch.randn(n, rank, generator=g) @ torch.randn(rank, dim, generator=g) / rank**0.5
    data = (data - data.mean(0)) / data.std(0)  # standardised, as LoRA vectors are
    torch.manual_seed(0)
    vae = LoRAVAE(VAEConfig(dim=dim, latent=8, hidden=64, depth=1, beta=1e-3))
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(300):
        idx = torch.randint(0, n, (64,), generator=g)
        loss, parts = vae(data[idx], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        error = (vae.reconstruct(data) - data).square().mean().item()
    assert error < 0.02 * data.var().item(), error
    assert parts["kl"] > 0
