"""Classifier-free guidance: the guided denoiser and label dropout in training."""

import pytest
import torch

from condlora.core.errors import CondloraError
from condlora.core.labels import class_weights
from condlora.diffusion import GuidedDenoiser
from condlora.image.build import build_denoiser
from condlora.image.config import load_config
from condlora.image.task import ImageBatches

from .conftest import CONFIGS


def randomised(cfg):
    torch.manual_seed(0)
    d = build_denoiser(cfg).eval()
    with torch.no_grad():  # zero-initialised output layers would hide the class
        for p in d.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return d


def test_guided_output_follows_the_formula(tiny_overrides):
    d = randomised(load_config(CONFIGS / "digits-uclora.yaml", tiny_overrides))
    x, y = torch.randn(3, 1, 16, 16), torch.tensor([1, 4, 9])
    cond = d(x, 0.7, class_labels=y)
    uncond = d(x, 0.7, class_labels=torch.zeros(3, 10))
    assert not torch.allclose(cond, uncond, atol=1e-4)
    for scale in (1.0, 2.5):
        guided = GuidedDenoiser(d, scale, num_classes=10)(x, 0.7, class_labels=y)
        assert torch.allclose(guided, uncond + scale * (cond - uncond), atol=1e-5)


def test_class_weights_one_hot_and_pass_through():
    assert torch.equal(
        class_weights(torch.tensor([2, 0]), 3), torch.tensor([[0, 0, 1], [1, 0, 0.0]])
    )
    w = torch.tensor([[0.5, 0.5, 0.0]])
    assert class_weights(w, 3) is w
    assert class_weights(torch.tensor([0.0, 2.0, 0.0]), 3).shape == (1, 3)  # one row of weights
    with pytest.raises(CondloraError, match=r"shape \(batch, 3\)"):
        class_weights(torch.rand(2, 4), 3)
    with pytest.raises(CondloraError, match=r"shape \(batch,\)"):
        class_weights(torch.zeros(2, 2, dtype=torch.long), 3)


def test_label_dropout_nulls_about_that_fraction(tiny_overrides):
    cfg = load_config(
        CONFIGS / "digits-baseline.yaml", tiny_overrides + ["train.label_dropout=0.3"]
    )
    batches = ImageBatches(cfg, torch.zeros(20, 1, 16, 16), torch.zeros(20, dtype=torch.long))
    torch.manual_seed(0)
    labels = batches.class_labels(torch.arange(2000) % 10)
    nulled = (labels.sum(1) == 0).float().mean().item()
    assert abs(nulled - 0.3) < 0.04
    kept = labels[labels.sum(1) > 0]
    assert torch.equal(kept.sum(1), torch.ones(len(kept)))


def test_embedding_guided_output_follows_the_formula():
    from condlora.diffusion import Denoiser, EmbeddingGuidedDenoiser, make_precond
    from condlora.nets import VectorDenoiser, VectorNetConfig

    torch.manual_seed(0)
    net = VectorDenoiser(VectorNetConfig(dim=6, width=16, depth=1, cond_dim=4, cond_width=8))
    with torch.no_grad():  # fresh ADALoRA heads (B = 0) would ignore the embedding
        for p in net.parameters():
            p.normal_(std=0.3)
    d = Denoiser(net, make_precond("v", num_timesteps=50)).eval()
    x, e = torch.randn(3, 6), torch.randn(3, 4)
    with torch.no_grad():
        cond = d(x, 0.7, embedding=e)
        uncond = d(x, 0.7)  # no embedding: the learned null embedding for every row
        assert not torch.allclose(cond, uncond, atol=1e-4)
        for scale in (0.0, 1.0, 2.5):
            guided = EmbeddingGuidedDenoiser(d, scale)(x, 0.7, embedding=e)
            torch.testing.assert_close(guided, uncond + scale * (cond - uncond))
