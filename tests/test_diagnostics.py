"""Diagnostics: TimeLoRA neighbouring-row cosine, ClassLoRA float class weights and sweeps."""

import math

import pytest
import torch

from condlora.evaluation.diagnostics import (
    class_mix_weights,
    has_class_lora,
    neighbour_cosine,
    sweep_grid,
    time_similarity,
    time_tables,
)
from condlora.image.build import build_denoiser
from condlora.image.config import load_config
from condlora.image.generate import generate
from condlora.lora import TimeComposer, hat_table

from .conftest import CONFIGS, TINY


def tiny(name: str, *extra: str):
    cfg = load_config(CONFIGS / name, [*TINY, *extra])
    return cfg, build_denoiser(cfg).eval()


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight non-zero (LoRA B and zero-initialised convs too), so every path shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_neighbour_cosine_of_a_hand_made_table():
    table = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 2.0]])
    expected = [1 / math.sqrt(2), 1 / math.sqrt(2), 1.0]
    assert neighbour_cosine(table).tolist() == pytest.approx(expected)


def test_time_similarity_mean_and_min_over_layers(one_thread):
    _, model = tiny("digits-timelora.yaml")
    composers = [m for m in model.modules() if isinstance(m, TimeComposer)]
    assert len(composers) == len(time_tables(model)) > 1
    rows, m = composers[0].omega.shape
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for c in composers:
            c.omega.copy_(torch.rand(rows, m, generator=gen))
    per_layer = []
    for c in composers:  # plainly: cos = a.b / (|a| |b|) row by row
        t = c.omega.detach().double()
        cos = [float(t[k] @ t[k + 1] / (t[k].norm() * t[k + 1].norm())) for k in range(rows - 1)]
        per_layer.append(cos)
    sims = time_similarity(model)
    assert sims["layers"] == len(composers)
    assert sims["mean"] == pytest.approx(sum(sum(c) / len(c) for c in per_layer) / len(per_layer))
    assert sims["min"] == pytest.approx(min(min(c) for c in per_layer), rel=1e-5)
    init = neighbour_cosine(hat_table(rows, m))
    assert sims["init_mean"] == pytest.approx(float(init.mean()))
    start = hat_table(rows, m).double()
    change = [float((c.omega.detach().double() - start).norm() / start.norm()) for c in composers]
    assert sims["change"] == pytest.approx(sum(change) / len(change), rel=1e-5)


def test_models_without_tables_or_class_lora():
    _, baseline = tiny("digits-baseline.yaml")
    assert time_similarity(baseline) is None
    assert not has_class_lora(baseline)
    _, classlora = tiny("digits-classlora.yaml")
    assert has_class_lora(classlora)


def test_class_weight_sweeps():
    mixed = class_mix_weights(2, 5, [0.0, 0.25, 1.0], 10)
    expected = torch.zeros(3, 10)
    expected[:, 2] = torch.tensor([1.0, 0.75, 0.0])
    expected[:, 5] = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(mixed, expected)


@pytest.mark.parametrize("mode", ["both", "lora_only"])
def test_float_one_hot_weights_act_like_integer_labels(mode, one_thread):
    _, model = tiny("digits-classlora.yaml", f"net.cond_mode={mode}")
    randomise(model)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((4,), 0.7)
    labels = torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        by_index = model(x, sigma, class_labels=labels)
        by_weights = model(x, sigma, class_labels=torch.eye(10)[labels])
        doubled = model(x, sigma, class_labels=2 * torch.eye(10)[labels])
    torch.testing.assert_close(by_weights, by_index)
    assert (doubled - by_index).abs().max() > 0.01  # the scale reaches the model


def test_sweep_grid_shares_noise_along_rows(one_thread):
    cfg, model = tiny("digits-classlora.yaml")
    randomise(model)
    columns = [s * torch.eye(10)[:3] for s in (1.0, 0.0, 1.0)]  # rows: classes 0, 1, 2
    grid = sweep_grid(model, cfg, columns, seed=5)
    assert grid.shape == (9, 1, 16, 16)
    first = generate(model, cfg, 3, columns[0], seed=5)
    for r in range(3):
        torch.testing.assert_close(grid[r * 3], first[r])  # row-major: (row r, column 0)
        torch.testing.assert_close(grid[r * 3 + 2], grid[r * 3])  # same weights, same noise
        assert not torch.allclose(grid[r * 3 + 1], grid[r * 3], atol=1e-4)  # scale 0 differs
