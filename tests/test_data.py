"""The embedded digits data set and its split."""

import pytest
import torch

from condlora.core.errors import DataError
from condlora.data import load_digits_images, stratified_split


@pytest.mark.parametrize("res", [8, 16, 32])
def test_load_shapes_range_labels(res):
    images, labels = load_digits_images(res)
    assert images.shape == (1797, 1, res, res) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.long
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.min() == -1.0 and images.max() == 1.0
    counts = torch.bincount(labels)
    assert len(counts) == 10 and counts.sum() == 1797 and counts.min() > 170


def test_upsampling_keeps_the_mean():
    small, _ = load_digits_images(8)
    big, _ = load_digits_images(16)
    assert torch.allclose(torch.nn.functional.avg_pool2d(big, 2).mean(), small.mean(), atol=0.02)


@pytest.mark.parametrize("res", [12, 4, 0])
def test_bad_resolution(res):
    with pytest.raises(DataError):
        load_digits_images(res)


def test_split_sizes_disjoint_stratified():
    images, labels = load_digits_images(16)
    (tx, ty), (hx, hy) = stratified_split(images, labels)
    assert tx.shape == (1500, 1, 16, 16) and ty.shape == (1500,)
    assert hx.shape == (297, 1, 16, 16) and hy.shape == (297,)
    # disjoint and complete: every image lands in exactly one part
    flat = images.flatten(1)
    rows = {tuple(r.tolist()) for r in flat}
    train_rows = {tuple(r.tolist()) for r in tx.flatten(1)}
    hold_rows = {tuple(r.tolist()) for r in hx.flatten(1)}
    assert not train_rows & hold_rows and train_rows | hold_rows == rows
    held = torch.bincount(hy, minlength=10)
    assert held.min() >= 29 and held.max() <= 30


def test_split_deterministic_per_seed():
    images, labels = load_digits_images(8)
    (a, _), (b, _) = stratified_split(images, labels, seed=3)
    (c, _), (d, _) = stratified_split(images, labels, seed=3)
    (_, _), (e, _) = stratified_split(images, labels, seed=4)
    assert torch.equal(a, c) and torch.equal(b, d)
    assert not torch.equal(b, e)


def test_split_bad_input():
    images, labels = load_digits_images(8)
    with pytest.raises(DataError):
        stratified_split(images, labels[:-1])
    with pytest.raises(DataError):
        stratified_split(images, labels, holdout=5000)
    (tx, _), (hx, _) = stratified_split(images, labels, holdout=0)
    assert len(tx) == 1797 and len(hx) == 0
