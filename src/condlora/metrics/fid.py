"""FID through torchmetrics' FrechetInceptionDistance, with any feature network.

torchmetrics hands the feature module images in [0, 1] (normalize=True) or uint8 in [0, 255]
(its construction probe when normalize=False); `FeatureAdapter` turns either into our [-1, 1]
convention and the right channel count, then returns (N, num_features) float64 features.
"""

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from condlora.core.errors import DataError


class FeatureAdapter(nn.Module):
    """Wrap a [-1, 1]-image feature function for torchmetrics' FrechetInceptionDistance."""

    def __init__(
        self,
        feature: Callable[[torch.Tensor], torch.Tensor],
        num_features: int,
        input_channels: int = 3,
    ):
        super().__init__()
        if isinstance(feature, nn.Module):
            self.net = feature
        elif isinstance(getattr(feature, "__self__", None), nn.Module):
            self.owner = feature.__self__  # a bound method such as classifier.features
        self.fn = feature
        self.num_features = int(num_features)
        self.input_channels = int(input_channels)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 [0, 255] or float [0, 1] -> (N, num_features) float64."""
        if imgs.ndim != 4:
            raise DataError(f"FID needs (N, C, H, W) images, got shape {tuple(imgs.shape)}")
        x = imgs.float() / 255.0 if imgs.dtype == torch.uint8 else imgs.float()
        x = x * 2.0 - 1.0
        c, want = x.shape[1], self.input_channels
        if c != want:
            if want == 1:
                x = x.mean(dim=1, keepdim=True)
            elif c == 1:
                x = x.expand(-1, want, -1, -1)
            else:
                raise DataError(f"feature network takes {want}-channel images, got {c} channels")
        with torch.no_grad():
            out = self.fn(x).reshape(x.shape[0], -1)
        if out.shape[1] != self.num_features:
            raise DataError(
                f"feature network gave {out.shape[1]} features, not {self.num_features}"
            )
        return out.double()


class PrecomputedFeatures(nn.Module):
    """The identity as torchmetrics' feature network, for features extracted beforehand."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features pass through."""
        return features


def frechet_of_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FD between two (N, D) feature sets, computed by torchmetrics' FrechetInceptionDistance."""
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]))
    metric.update(torch.as_tensor(real).double(), real=True)
    metric.update(torch.as_tensor(fake).double(), real=False)
    return float(metric.compute())


def frechet_to_stats(fake: torch.Tensor, mu: np.ndarray, sigma: np.ndarray, num_real: int) -> float:
    """FD of (N, D) features to cached real statistics (mean, covariance, count), by torchmetrics.

    The real side is loaded into the metric's running sums, which reproduce mu and sigma:
    sum = n mu, sum of outer products = (n - 1) sigma + n mu mu^T.
    """
    mu_t = torch.as_tensor(mu, dtype=torch.float64)
    sigma_t = torch.as_tensor(sigma, dtype=torch.float64)
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(len(mu_t)))
    metric.real_features_sum = mu_t * num_real
    metric.real_features_cov_sum = sigma_t * (num_real - 1) + num_real * torch.outer(mu_t, mu_t)
    metric.real_features_num_samples = torch.tensor(num_real)
    metric.update(torch.as_tensor(fake).double(), real=False)
    return float(metric.compute())


def frechet_metric(
    feature: Callable[[torch.Tensor], torch.Tensor],
    num_features: int,
    input_channels: int = 3,
) -> FrechetInceptionDistance:
    """torchmetrics FID over `feature`; update it with images in [0, 1] (normalize=True)."""
    adapter = FeatureAdapter(feature, num_features, input_channels)
    return FrechetInceptionDistance(feature=adapter, normalize=True)


def _num_features(feature: Callable[[torch.Tensor], torch.Tensor], probe: torch.Tensor) -> int:
    n = getattr(feature, "num_features", None)
    if isinstance(n, int):
        return n
    with torch.no_grad():
        return int(feature(probe).reshape(probe.shape[0], -1).shape[1])


def frechet_distance_of(
    feature: Callable[[torch.Tensor], torch.Tensor],
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    batch_size: int = 256,
) -> float:
    """Frechet distance between `feature` statistics of two [-1, 1] image sets (torchmetrics)."""
    for name, imgs in (("images_a", images_a), ("images_b", images_b)):
        if not isinstance(imgs, torch.Tensor) or imgs.ndim != 4 or imgs.shape[0] < 2:
            shape = tuple(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs).__name__
            raise DataError(f"{name} must be (N >= 2, C, H, W) images in [-1, 1], got {shape}")
    if images_a.shape[1] != images_b.shape[1]:
        raise DataError(f"channel mismatch: {images_a.shape[1]} vs {images_b.shape[1]}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    channels = images_a.shape[1]
    metric = frechet_metric(feature, _num_features(feature, images_a[:2].float()), channels)
    device = next(metric.parameters(), torch.empty(0)).device
    metric = metric.to(device)
    for imgs, real in ((images_a, True), (images_b, False)):
        for start in range(0, imgs.shape[0], batch_size):
            batch = imgs[start : start + batch_size].to(device).float()
            metric.update((batch + 1.0) / 2.0, real=real)
    return float(metric.compute())
