"""The prior's networks: ADALoRA, AdaNorm and the residual block against plain formulas,
the null-condition convention, UC-LoRA injection, and the denoiser inside condlora.diffusion."""

import copy
import functools

import pytest
import torch

from condlora.core.errors import ConfigError
from condlora.diffusion import Denoiser, make_precond, sample
from condlora.lora import LoRAConfig, conditioning, lora_layers, remove
from condlora.nets import AdaLoRA, AdaNorm, ResMLPBlock, VectorDenoiser, VectorNetConfig
from condlora.synthesis.model import build_prior_net, uc_lora_config

pytestmark = pytest.mark.usefixtures("one_thread")

W, R, CW = 6, 2, 5  # block width, ADALoRA rank, condition width


def randomise(module, seed=0, skip=()):
    """Every parameter to N(0, 0.5^2), except those whose name contains a `skip` part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not any(s in name for s in skip):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def silu(v):
    return v * torch.sigmoid(v)


def linear(layer, v):
    return layer.weight @ v + layer.bias


def layer_norm(v, ln):
    mean = v.mean()
    var = ((v - mean) ** 2).mean()
    return (v - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def ada_lora_ref(mod, x_i, c_i):
    """One sample, one token: [A; B] = W silu(c) + b, reshaped to (W, r) each; x + (x A) B^T."""
    p = linear(mod.head, silu(c_i))
    a = p[: W * R].reshape(W, R)
    b = p[W * R :].reshape(W, R)
    return x_i + b @ (a.T @ x_i)


def ada_norm_ref(mod, x_i, c_i):
    p = linear(mod.head, silu(c_i))
    return x_i * (1 + p[:W]) + p[W:]


def block_ref(block, h_i, t_i, c_i, mode):
    """The block's formula for one sample, one token, written out."""
    h_i = h_i + linear(block.time_proj, silu(t_i))
    x = layer_norm(h_i, block.norm)
    if mode == "adalora":
        x = ada_lora_ref(block.modulation, x, c_i)
    elif mode == "adanorm":
        x = ada_norm_ref(block.modulation, x, c_i)
    return h_i + linear(block.fc2, silu(linear(block.fc1, x)))


@pytest.mark.parametrize("tokens", [0, 3])
def test_ada_lora_matches_per_sample_formula(tokens):
    mod = randomise(AdaLoRA(CW, W, R))
    x = torch.randn(4, *([tokens] if tokens else []), W)
    c = torch.randn(4, CW)
    out = mod(x, c)
    for i in range(4):
        rows = x[i] if tokens else x[i : i + 1]
        ref = torch.stack([ada_lora_ref(mod, row, c[i]) for row in rows])
        torch.testing.assert_close(out[i] if tokens else out[i : i + 1], ref)
    a, b = mod.factors(c)
    assert a.shape == b.shape == (4, W, R)


@pytest.mark.parametrize("tokens", [0, 3])
def test_ada_norm_matches_per_sample_formula(tokens):
    mod = randomise(AdaNorm(CW, W))
    x = torch.randn(4, *([tokens] if tokens else []), W)
    c = torch.randn(4, CW)
    out = mod(x, c)
    for i in range(4):
        rows = x[i] if tokens else x[i : i + 1]
        ref = torch.stack([ada_norm_ref(mod, row, c[i]) for row in rows])
        torch.testing.assert_close(out[i] if tokens else out[i : i + 1], ref)


@pytest.mark.parametrize("mode", ["none", "adanorm", "adalora"])
@pytest.mark.parametrize("tokens", [0, 3])
def test_block_matches_formula(mode, tokens):
    block = randomise(ResMLPBlock(W, 1.5, time_dim=4, cond_dim=CW, cond_mode=mode, rank=R))
    h = torch.randn(3, *([tokens] if tokens else []), W)
    t, c = torch.randn(3, 4), torch.randn(3, CW)
    out = block(h, t, c)
    assert out.shape == h.shape
    for i in range(3):
        rows = h[i] if tokens else h[i : i + 1]
        ref = torch.stack([block_ref(block, row, t[i], c[i], mode) for row in rows])
        torch.testing.assert_close(out[i] if tokens else out[i : i + 1], ref)


def test_plain_block_is_the_vae_block():
    block = randomise(ResMLPBlock(W, 2.0))
    h = torch.randn(3, W)
    # no time, no condition: h + fc2(SiLU(fc1(LayerNorm(h))))
    ref = torch.stack(
        [r + linear(block.fc2, silu(linear(block.fc1, layer_norm(r, block.norm)))) for r in h]
    )
    torch.testing.assert_close(block(h), ref)
    with pytest.raises(ConfigError, match="t_emb"):
        ResMLPBlock(W, time_dim=4)(h)
    with pytest.raises(ConfigError, match="condition"):
        ResMLPBlock(W, cond_dim=CW, cond_mode="adanorm")(h)


@pytest.mark.parametrize("mode", ["adanorm", "adalora"])
def test_fresh_modulation_ignores_the_condition_exactly(mode):
    # every weight random except the modulation heads, which keep their initialisation
    block = randomise(ResMLPBlock(W, time_dim=4, cond_dim=CW, cond_mode=mode), skip=["modulation"])
    h, t = torch.randn(3, W), torch.randn(3, 4)
    c1, c2 = torch.randn(3, CW), torch.randn(3, CW)
    assert torch.equal(block(h, t, c1), block(h, t, c2))
    randomise(block.modulation)  # non-zero output factors: now the condition matters
    assert not torch.allclose(block(h, t, c1), block(h, t, c2))


# ---- the whole denoiser ----


def tiny_config(mode="adalora", arch="mlp", **kw):
    base = dict(dim=8, width=16, depth=2, cond_dim=4, cond_width=8, rank=2, time_channels=8)
    base.update(chunk=4, heads=2)
    return VectorNetConfig(cond_mode=mode, arch=arch, **(base | kw))


def tiny_uc(config):
    lora = uc_lora_config(config, num_bases=3)
    # 4 channels per GroupNorm group: with 2, each normalised pair is +-1 whatever its
    # input, and the composer's output barely depends on the condition
    lora.mlp_widths, lora.mlp_groups = [8, 8], 2
    return lora


def tiny_net(mode="adalora", arch="mlp", **kw):
    config = tiny_config(mode, arch, **kw)
    return build_prior_net(config, tiny_uc(config) if mode == "uc_lora" else None)


ARCHS = ["mlp", "transformer"]
COND = ["adalora", "adanorm", "uc_lora"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["adalora", "adanorm"])
def test_fresh_net_ignores_the_condition_exactly(arch, mode):
    net = randomise(tiny_net(mode, arch), skip=["modulation"])
    x, t = torch.randn(5, 8), torch.randn(5)
    e1, e2 = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.equal(net(x, t, e1), net(x, t, e2))
    randomise(net)
    assert not torch.allclose(net(x, t, e1), net(x, t, e2))


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_net_outputs_zero(arch):
    net = tiny_net("adalora", arch)
    assert torch.equal(net(torch.randn(3, 8), torch.randn(3), torch.randn(3, 4)), torch.zeros(3, 8))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", COND)
def test_null_condition_convention(arch, mode):
    torch.manual_seed(0)
    net = tiny_net(mode, arch)
    randomise(net)
    x, t, e = torch.randn(4, 8), torch.rand(4) * 999, torch.randn(4, 4)
    uncond = net(x, t)  # embedding=None: the whole batch unconditional
    cond = net(x, t, embedding=e)
    assert (cond - uncond).abs().max() > 1e-2  # the condition matters, far above rounding
    # embedding=None is the learned null embedding in every row
    null = net.null_embedding.detach().expand(4, -1)
    torch.testing.assert_close(uncond, net(x, t, embedding=null))
    # drop: True rows unconditional, False rows as without drop
    drop = torch.tensor([True, False, True, False])
    mixed = net(x, t, embedding=e, drop=drop)
    torch.testing.assert_close(mixed[drop], uncond[drop])
    torch.testing.assert_close(mixed[~drop], cond[~drop])
    torch.testing.assert_close(net(x, t, embedding=e, drop=torch.ones(4, dtype=bool)), uncond)
    # every parameter takes part in the graph even when no row is dropped (DDP needs that)
    net(x, t, embedding=e).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_condition_errors():
    net = tiny_net()
    x, t = torch.randn(2, 8), torch.randn(2)
    with pytest.raises(ConfigError, match=r"embedding must have shape \(2, 4\)"):
        net(x, t, embedding=torch.randn(2, 5))
    with pytest.raises(ConfigError, match="drop"):
        net(x, t, embedding=torch.randn(2, 4), drop=torch.ones(3, dtype=bool))
    with pytest.raises(ConfigError, match=r"x must have shape \(batch, 8\)"):
        net(torch.randn(2, 9), t)
    with pytest.raises(ConfigError, match="unconditional"):
        tiny_net("none")(x, t, embedding=torch.randn(2, 4))
    with pytest.raises(ConfigError, match="chunk 3 does not divide dim 8"):
        tiny_config(arch="transformer", chunk=3)
    with pytest.raises(ConfigError, match="unknown VectorNetConfig.cond_mode 'film'"):
        tiny_config("film")
    with pytest.raises(ConfigError, match="uc_lora"):
        build_prior_net(tiny_config("adanorm"), LoRAConfig(method="uc"))


@pytest.mark.parametrize("arch", ARCHS)
def test_time_enters_the_same_way_in_every_mode(arch):
    """Apart from the modulation heads, every mode has the same parameters, time path included."""

    def shapes(mode):
        net = VectorDenoiser(tiny_config(mode, arch))
        return {n: p.shape for n, p in net.named_parameters() if "modulation" not in n}

    reference = shapes("uc_lora")
    assert any("time_proj" in n for n in reference) and "cond_embed.1.weight" in reference
    assert shapes("adalora") == reference == shapes("adanorm")
    no_cond = shapes("none")
    assert no_cond == {n: s for n, s in reference.items() if "cond" not in n and "null" not in n}


@pytest.mark.parametrize("arch", ARCHS)
def test_uc_lora_injection(arch):
    config = tiny_config("uc_lora", arch)
    # random base weights; LoRA (A, B, composer MLPs) as injected, so B = 0
    injected = randomise(build_prior_net(config, tiny_uc(config)), skip=["lora_", "composer"])
    plain = copy.deepcopy(injected)
    remove(plain)  # the same net without its adapters
    assert not lora_layers(plain)
    x, t, e1, e2 = torch.randn(3, 8), torch.randn(3), torch.randn(3, 4), torch.randn(3, 4)
    before = plain(x, t, e1)
    assert torch.equal(before, plain(x, t, e2))  # plain blocks: the condition feeds nothing
    names = sorted(lora_layers(injected))
    assert names and all(n.endswith((".fc1", ".fc2")) for n in names)
    assert len(names) == 2 * config.depth
    torch.testing.assert_close(injected(x, t, e1), before)  # fresh LoRA: B = 0
    for layer in lora_layers(injected).values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    out1, out2 = injected(x, t, e1), injected(x, t, e2)
    assert not torch.allclose(out1, before) and not torch.allclose(out1, out2)
    # the composers read the net's own condition embedding: passing it explicitly agrees
    c = injected.cond_embed(injected.condition(3, e1, None))
    with conditioning(injected, emb=c):
        torch.testing.assert_close(injected(x, t, e1), out1)
    with pytest.raises(ConfigError, match="method 'uc'"):
        build_prior_net(config, LoRAConfig(method="time"))


# ---- inside condlora.diffusion ----


@pytest.mark.parametrize("objective", ["v", "edm"])
@pytest.mark.parametrize("mode", COND)
def test_denoiser_and_samplers_on_vectors(objective, mode):
    net = randomise(tiny_net(mode, "mlp" if mode != "adanorm" else "transformer"))
    den = Denoiser(net, make_precond(objective, num_timesteps=50))
    x0, e = torch.randn(6, 8), torch.randn(6, 4)
    drop = torch.rand(6) < 0.5
    loss = den.loss(x0, generator=torch.Generator().manual_seed(0), embedding=e, drop=drop)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert net.null_embedding.grad is not None and net.null_embedding.grad.abs().sum() > 0
    for sampler in ("heun", "ddim", "ddpm"):
        gen = torch.Generator().manual_seed(1)
        out = sample(den, (6, 8), sampler=sampler, steps=4, generator=gen, embedding=e)
        assert out.shape == (6, 8) and torch.isfinite(out).all()
    # D(x, sigma) matches EDM eq. 7 with the net called on (B, D)
    sigma = torch.full((6,), 0.7)
    c_skip, c_out, c_in = den.precond.scalings(sigma)
    with torch.no_grad():
        ref = c_skip[:, None] * x0 + c_out[:, None] * net(
            c_in[:, None] * x0, den.precond.noise_label(sigma), embedding=e
        )
        torch.testing.assert_close(den(x0, sigma, embedding=e), ref)


E_TOY, D_TOY, TOY_STEPS = 4, 8, 200


def toy_batch(n, gen, mixing):
    """Vectors that are a linear function of the embedding, plus a little noise."""
    e = torch.randn(n, E_TOY, generator=gen)
    return e @ mixing.T / E_TOY**0.5 + 0.1 * torch.randn(n, D_TOY, generator=gen), e


@functools.cache
def toy_losses(mode):
    """Held-out v-prediction loss before and after TOY_STEPS Adam steps of Denoiser.loss."""
    mixing = torch.randn(D_TOY, E_TOY, generator=torch.Generator().manual_seed(0))
    precond = make_precond("v", num_timesteps=1000)
    x_ev, e_ev = toy_batch(512, torch.Generator().manual_seed(1), mixing)
    g_ev = torch.Generator().manual_seed(2)
    sigma_ev = precond.sample_sigma(512, generator=g_ev)
    noise_ev = torch.randn(512, D_TOY, generator=g_ev)
    torch.manual_seed(0)
    den = Denoiser(tiny_net(mode, width=32, cond_width=16), precond)
    cond = (lambda e: {}) if mode == "none" else (lambda e: {"embedding": e})
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(3)

    def held_out():
        with torch.no_grad():
            return den.loss(x_ev, sigma=sigma_ev, noise=noise_ev, **cond(e_ev)).item()

    first = held_out()
    for _ in range(TOY_STEPS):
        x, e = toy_batch(128, gen, mixing)
        loss = den.loss(x, generator=gen, **cond(e))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, held_out()


@pytest.mark.slow
@pytest.mark.parametrize("mode", COND)
def test_conditioning_beats_unconditional_on_a_toy_problem(mode):
    first, conditioned = toy_losses(mode)
    _, unconditioned = toy_losses("none")
    assert conditioned < 0.6 * first
    assert conditioned < 0.7 * unconditioned, (conditioned, unconditioned)
