"""Frechet distances of features through torchmetrics' FrechetInceptionDistance.

condlora extracts features itself (the digits CNN, or its port of the FID Inception-v3), then
hands them to torchmetrics, which computes the distance: `PrecomputedFeatures` is the identity
as torchmetrics' feature network.
"""

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from condlora.core.errors import DataError


class PrecomputedFeatures(nn.Module):
    """The identity as torchmetrics' feature network, for features extracted beforehand."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features pass through."""
        return features


NONFINITE_FEATURES = (
    "features hold NaN or inf values (diverged samples?): refusing to compute a distance"
)


def check_finite(*arrays: torch.Tensor | np.ndarray) -> None:
    """DataError if any array holds NaN or inf (before sqrtm, which can crash on them)."""
    for a in arrays:
        if not torch.isfinite(torch.as_tensor(a)).all():
            raise DataError(NONFINITE_FEATURES)


def frechet_of_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FD between two (N, D) feature sets, computed by torchmetrics' FrechetInceptionDistance."""
    check_finite(real, fake)
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]))
    metric.update(torch.as_tensor(real).double(), real=True)
    metric.update(torch.as_tensor(fake).double(), real=False)
    return float(metric.compute())


def frechet_to_stats(fake: torch.Tensor, mu: np.ndarray, sigma: np.ndarray, num_real: int) -> float:
    """FD of (N, D) features to cached real statistics (mean, covariance, count), by torchmetrics.

    The real side is loaded into the metric's running sums, which reproduce mu and sigma:
    sum = n mu, sum of outer products = (n - 1) sigma + n mu mu^T.
    """
    check_finite(fake, mu, sigma)
    mu_t = torch.as_tensor(mu, dtype=torch.float64)
    sigma_t = torch.as_tensor(sigma, dtype=torch.float64)
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(len(mu_t)))
    metric.real_features_sum = mu_t * num_real
    metric.real_features_cov_sum = sigma_t * (num_real - 1) + num_real * torch.outer(mu_t, mu_t)
    metric.real_features_num_samples = torch.tensor(num_real)
    metric.update(torch.as_tensor(fake).double(), real=False)
    return float(metric.compute())
