"""Tests for condlora.diffusion: schedules, preconditioners and the denoiser loss."""

import math

import pytest
import torch
from torch import nn

from condlora.core.errors import ConfigError
from condlora.diffusion import (
    Denoiser,
    EDMPrecond,
    EpsPrecond,
    VPrecond,
    X0Precond,
    alphas_cumprod,
    cosine_betas,
    karras_sigmas,
    linear_betas,
    make_precond,
    sample,
)

from .conftest import FixedOutput

PRECONDS = {
    "edm": lambda: make_precond("edm"),
    "ddpm": lambda: make_precond("ddpm", "linear"),
    "v": lambda: make_precond("v", "cosine"),
    "x0": lambda: make_precond("x0", "linear"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    """MLP on vectors: F(x_in, noise_labels) with the label appended to the input."""

    def __init__(self, dim: int = 3, hidden: int = 32, num_classes: int = 0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.emb = nn.Embedding(num_classes, dim + 1) if num_classes else None

    def forward(self, x, noise_labels, class_labels=None):
        h = torch.cat([x, noise_labels[:, None].to(x.dtype) / 1000], dim=1)  # labels up to T
        if class_labels is not None:
            h = h + self.emb(class_labels)
        return self.mlp(h)


class ConvNet(nn.Module):
    """Small conv net for image-shaped inputs; the label shifts every pixel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, noise_labels):
        return torch.tanh(self.conv(x) + noise_labels[:, None, None, None])


# --- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name)
    betas = linear_betas(1000) if name == "linear" else cosine_betas(1000)
    abar = alphas_cumprod(betas)
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    torch.testing.assert_close(abar, sched.alphas_cumprod.double(), atol=1e-6, rtol=0)
    # the tail of abar is below 1e-6: check the betas to relative precision too
    torch.testing.assert_close(betas, sched.betas.double(), rtol=1e-6, atol=0)


def test_karras_sigmas():
    s = karras_sigmas(18, 0.002, 80.0)
    assert s.shape == (19,) and s.dtype == torch.float32
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    assert s[-1].item() == 0.0 and (s[1:] < s[:-1]).all()
    # EDM eq. 5: sigma_i^(1/rho) is linear in i
    r = s[:-1].double() ** (1 / 7)
    torch.testing.assert_close(r.diff(), r.diff()[:1].expand(17), rtol=1e-4, atol=0)
    assert karras_sigmas(1, 0.002, 80.0).tolist() == [80.0, 0.0]


@pytest.mark.parametrize("name", list(PRECONDS))
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_sampling_sigmas(name, steps):
    p = PRECONDS[name]()
    s = p.sampling_sigmas(steps)
    assert s.shape == (steps + 1,) and s.dtype == torch.float32
    assert s[-1] == 0 and (s[1:] < s[:-1]).all()
    assert s[0].item() == pytest.approx(p.sigma_max, rel=1e-5)
    if steps > 1:
        assert s[-2].item() == pytest.approx(p.sigma_min, rel=1e-5)


def test_discrete_sampling_sigmas_are_a_subset():
    p = make_precond("ddpm")
    s = p.sampling_sigmas(100)[:-1].double()
    # every sampling sigma is one of the T training sigmas
    dist = (s[:, None] - p.sigmas[None, :]).abs().min(dim=1).values
    assert (dist / s < 1e-6).all()
    # asking for more steps than T gives all T of them
    assert p.sampling_sigmas(5000).shape == (1001,)


def test_make_precond_and_sample_errors():
    assert isinstance(make_precond("edm"), EDMPrecond)
    assert isinstance(make_precond("ddpm", "cosine", 100), EpsPrecond)
    assert isinstance(make_precond("v", num_timesteps=50), VPrecond)
    assert isinstance(make_precond("x0", num_timesteps=50), X0Precond)
    assert make_precond("ddpm", num_timesteps=50).num_timesteps == 50
    assert make_precond("edm", sigma_data=1.0).sigma_data == 1.0
    with pytest.raises(ConfigError, match="ddpm, edm, v"):
        make_precond("flow")
    with pytest.raises(ConfigError, match="linear, cosine"):
        make_precond("ddpm", "sigmoid")
    with pytest.raises(ConfigError, match="bogus"):
        make_precond("edm", bogus=1.0)
    d = Denoiser(TinyNet(), make_precond("edm"))
    with pytest.raises(ConfigError, match="ddpm, ddim, heun"):
        sample(d, (2, 3), sampler="euler_a")


# --- preconditioners ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRECONDS))
def test_time_of_label_monotone_in_unit_interval(name):
    p = PRECONDS[name]()
    sigma = torch.logspace(-4, 5, 400)  # beyond both ends of every schedule
    t = p.time_of_label(p.noise_label(sigma))
    assert t.shape == sigma.shape
    assert (t >= 0).all() and (t <= 1).all()
    assert (t.diff() >= 0).all() and t[0] == 0 and t[-1] == 1  # clamped outside the range
    inside = (sigma > p.sigma_min * 1.01) & (sigma < p.sigma_max * 0.99)
    assert (t[inside].diff() > 0).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_eps_noise_label_at_discrete_sigmas_is_the_index(schedule):
    p = make_precond("ddpm", schedule)
    labels = p.noise_label(p.sigmas.float())
    assert labels.dtype == torch.float32
    torch.testing.assert_close(labels, torch.arange(1000.0), atol=1e-4, rtol=0)
    # halfway in log sigma between two steps -> halfway between the indices
    mid = (p.sigmas[10].log() + p.sigmas[11].log()).div(2).exp()
    assert p.noise_label(mid).item() == pytest.approx(10.5, abs=1e-4)
    assert p.time_of_label(labels)[[0, 999]].tolist() == pytest.approx([0.0, 1.0], abs=1e-6)


def test_edm_noise_label_and_scalings():
    p = EDMPrecond()
    sigma = torch.tensor([0.1, 0.5, 3.0])
    torch.testing.assert_close(p.noise_label(sigma), sigma.log() / 4)
    c_skip, c_out, c_in = p.scalings(sigma)
    # EDM Table 1 values at sigma = sigma_data
    assert c_skip[1].item() == pytest.approx(0.5) and c_in[1].item() == pytest.approx(2**0.5)
    # unit variance of the target (EDM eq. 8 derivation): c_skip^2 sd^2 ... = c_out^2
    sd = 0.5
    torch.testing.assert_close(c_out**2, (1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2)


@pytest.mark.parametrize("name", list(PRECONDS))
def test_sample_sigma(name):
    p = PRECONDS[name]()
    g = torch.Generator().manual_seed(0)
    s = p.sample_sigma(20000, generator=g)
    assert s.shape == (20000,) and s.dtype == torch.float32 and (s > 0).all()
    if name == "edm":
        assert s.log().mean().item() == pytest.approx(-1.2, abs=0.05)
        assert s.log().std().item() == pytest.approx(1.2, abs=0.05)
    else:
        # t ~ U{0..T-1}: the labels are integers with mean (T-1)/2
        t = p.noise_label(s)
        torch.testing.assert_close(t, t.round(), atol=1e-3, rtol=0)
        assert t.mean().item() == pytest.approx(499.5, abs=10)
    # same generator seed -> same sigmas
    g2 = torch.Generator().manual_seed(0)
    torch.testing.assert_close(p.sample_sigma(20000, generator=g2), s)


@pytest.mark.parametrize("name", ["ddpm", "v", "x0"])
def test_true_target_recovers_x0(name):
    p = PRECONDS[name]()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    t = torch.tensor([0, 1, 10, 300, 900, 999])
    abar = 1 / (1 + p.sigmas[t].float() ** 2)[:, None]
    if name == "ddpm":
        target = eps
    elif name == "x0":
        target = x0
    else:
        target = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    sigma = p.sigmas[t].float()
    d = Denoiser(FixedOutput(target), p)
    torch.testing.assert_close(d(x0 + sigma[:, None] * eps, sigma), x0, atol=1e-5, rtol=0)


def test_sigma_forms_broadcast_on_images():
    d = Denoiser(ConvNet(), make_precond("edm"))
    x = torch.randn(4, 2, 5, 5)
    out = d(x, 1.3)
    assert out.shape == x.shape
    torch.testing.assert_close(d(x, torch.tensor(1.3)), out)
    torch.testing.assert_close(d(x, torch.full((4,), 1.3)), out)
    # per-sample sigma: each row equals the row computed alone
    sig = torch.tensor([0.1, 1.0, 5.0, 40.0])
    out = d(x, sig)
    for i in range(4):
        torch.testing.assert_close(out[i : i + 1], d(x[i : i + 1], sig[i].item()))


# --- loss --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddpm", "v", "x0"])
def test_loss_matches_ddpm_reference(name):
    p = PRECONDS[name]()
    net = TinyNet()
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    abar = alphas_cumprod(cosine_betas(1000) if name == "v" else linear_betas(1000))
    a = abar[t].float()[:, None]
    # DDPM forward process x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, net sees (x_t, t)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = net(x_t, t.float())
    targets = {"ddpm": eps, "v": a.sqrt() * eps - (1 - a).sqrt() * x0, "x0": x0}
    target = targets[name]
    ref = (out - target).square().mean()
    loss = Denoiser(net, p).loss(x0, sigma=p.sigmas[t].float(), noise=eps)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-6)


def test_loss_matches_edm_reference():
    p = EDMPrecond()
    d = Denoiser(TinyNet(), p)
    g = torch.Generator().manual_seed(3)
    x0, n = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    sigma = p.sample_sigma(8, generator=g)
    # EDM eq. 2/8: lambda(sigma) * ||D(x0 + sigma n, sigma) - x0||^2
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    ref = (lam[:, None] * (d(x0 + sigma[:, None] * n, sigma) - x0).square()).mean()
    torch.testing.assert_close(d.loss(x0, sigma=sigma, noise=n), ref, rtol=1e-4, atol=1e-6)


def test_loss_sampling_is_seeded_and_forwards_cond():
    d = Denoiser(TinyNet(num_classes=4), make_precond("edm"))
    x0, y = torch.randn(16, 3), torch.randint(0, 4, (16,))
    l1 = d.loss(x0, generator=torch.Generator().manual_seed(5), class_labels=y)
    l2 = d.loss(x0, generator=torch.Generator().manual_seed(5), class_labels=y)
    l3 = d.loss(x0, generator=torch.Generator().manual_seed(5), class_labels=(y + 1) % 4)
    assert l1.ndim == 0 and l1 == l2 and l1 != l3
    l1.backward()
    assert all(q.grad is not None for q in d.parameters())


@pytest.mark.parametrize("name", list(PRECONDS))
def test_tiny_net_trains_on_two_clusters(name):
    torch.manual_seed(0)
    p = PRECONDS[name]()
    net = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = net

        def forward(self, x, noise_labels):
            return self.f(torch.cat([x, noise_labels[:, None] / 250], dim=1))

    d = Denoiser(Net(), p)
    g = torch.Generator().manual_seed(0)

    def data(n):
        centre = torch.randint(0, 2, (n, 1), generator=g) * 2.0 - 1
        return centre + 0.1 * torch.randn(n, 1, generator=g)

    # fixed evaluation batch: the same x0, sigma and noise before and after
    x_ev = data(2048)
    s_ev = p.sample_sigma(2048, generator=g)
    n_ev = torch.randn(2048, 1, generator=g)
    with torch.no_grad():
        before = d.loss(x_ev, sigma=s_ev, noise=n_ev).item()
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    for _ in range(200):
        loss = d.loss(data(256), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = d.loss(x_ev, sigma=s_ev, noise=n_ev).item()
    # part of each loss is irreducible (the noise at low sigma, the cluster at high sigma);
    # seen: edm 0.58x, ddpm 0.23x, v 0.77x, x0 0.71x; a wrong target or scaling stalls above
    bound = {"edm": 0.65, "ddpm": 0.3, "v": 0.82, "x0": 0.8}[name]
    assert math.isfinite(after) and after < bound * before, (before, after)
