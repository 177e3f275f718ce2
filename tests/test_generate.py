"""`generate`: batches, labels kept with their samples, fresh noise in every batch."""

import torch
from torch import nn

from condlora.diffusion import Denoiser, make_precond
from condlora.image.config import load_config
from condlora.image.generate import generate, labels_for

from .conftest import CONFIGS, TINY


class Fake(nn.Module):
    """A parameter-holding stand-in for a denoiser (generate reads the device off it)."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.precond = make_precond("edm")  # the samplers read their sigmas off it


class ClassMean(Fake):
    """A denoiser whose x0 estimate is the class index / 10 everywhere (ignores x)."""

    def forward(self, x, sigma, class_labels=None):
        value = class_labels.float().reshape(-1, 1, 1, 1) / 10
        return value.expand_as(x).to(x.dtype)


class Shrink(Fake):
    """A denoiser whose x0 estimate is x / 2: the sample keeps a trace of its noise."""

    def forward(self, x, sigma, class_labels=None):
        return x / 2


def test_labels_stay_with_their_samples_across_batches():
    cfg = load_config(CONFIGS / "digits-baseline.yaml", TINY)
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    out = generate(ClassMean(), cfg, len(labels), labels, batch_size=3)
    assert out.shape == (7, 1, 16, 16)
    # the sampler's last step lands on D(x) exactly: each sample is its own label's value
    expected = (labels.float() / 10).reshape(-1, 1, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_every_batch_draws_new_noise_and_a_seed_repeats():
    cfg = load_config(CONFIGS / "digits-baseline.yaml", TINY)
    labels = labels_for(cfg, 6)
    a = generate(Shrink(), cfg, 6, labels, batch_size=2, seed=5)
    assert not torch.equal(a[:2], a[2:4]) and not torch.equal(a[2:4], a[4:])
    assert torch.equal(a, generate(Shrink(), cfg, 6, labels, batch_size=2, seed=5))
    assert not torch.equal(a, generate(Shrink(), cfg, 6, labels, batch_size=2, seed=6))


def test_a_real_denoiser_samples_past_one_batch():
    cfg = load_config(CONFIGS / "digits-baseline.yaml", TINY)
    from condlora.image.build import build_denoiser

    torch.manual_seed(0)
    denoiser = build_denoiser(cfg).eval()
    assert isinstance(denoiser, Denoiser)
    out = generate(denoiser, cfg, 5, labels_for(cfg, 5), steps=2, batch_size=2)
    assert out.shape == (5, 1, 16, 16) and out.abs().max() <= 1


class Recording(Shrink):
    """Shrink that records the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x, sigma, class_labels=None):
        self.sizes.append(len(x))
        return super().forward(x, sigma, class_labels)


def test_a_net_without_lora_samples_in_request_batches_not_by_class():
    cfg = load_config(CONFIGS / "digits-baseline.yaml", TINY)
    labels = labels_for(cfg, 6)  # 0..5: a class per sample, nothing to merge without LoRA
    net = Recording()
    out = generate(net, cfg, 6, labels, steps=3, batch_size=4, seed=2)
    assert set(net.sizes) == {4, 2}  # the two requested batches, not six of one sample
    # sample i starts from the i-th noise drawn in request order; x0 = x / 2 makes the
    # sampler a positive multiple of that noise (clamped to [-1, 1]): the signs agree
    g = torch.Generator().manual_seed(2)
    first, second = torch.randn(4, 1, 16, 16, generator=g), torch.randn(2, 1, 16, 16, generator=g)
    assert torch.equal(torch.sign(out), torch.sign(torch.cat([first, second])))
