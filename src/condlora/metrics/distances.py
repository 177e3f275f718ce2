"""Distances between feature sets through torchmetrics: Frechet (FID's) and kernel (KID).

condlora extracts features itself (the digits CNN, or its port of the FID Inception-v3), then
hands them to torchmetrics, which computes the distance: `PrecomputedFeatures` is the identity
as torchmetrics' feature network.

KID (Binkowski et al. 2018) is the unbiased squared MMD with the cubic polynomial kernel
k(x, y) = (gamma x.y + 1)^3, gamma = 1 / d by default, averaged over random subsets of both
sets. Unlike FD it has no bias at small set sizes, so it is a useful second opinion on a few
thousand samples. gamma = 1 / d suits Inception features (small non-negative values);
features of larger scale make the cubic kernel huge and its estimate mostly noise, so
`kid_gamma` gives the scale-free choice gamma = 1 / E|x|^2 over the real features.
"""

import warnings

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

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


DEFAULT_SUBSET_SIZE = 1000
DEFAULT_SUBSETS = 100


def kid_from_features(
    real: torch.Tensor,
    fake: torch.Tensor,
    subset_size: int = DEFAULT_SUBSET_SIZE,
    subsets: int = DEFAULT_SUBSETS,
    seed: int = 0,
    gamma: float | None = None,
) -> tuple[float, float, int]:
    """(kid_mean, kid_std, subset size used) of two (N, D) feature sets.

    The features go through torchmetrics' KernelInceptionDistance with an identity feature
    module (they were extracted once, by the same network as the FD's). The subset size is
    capped at the smaller set; subsets are drawn with a seeded RNG (the global RNG is left as
    it was). gamma None: 1 / D.
    """
    for name, f in (("real", real), ("fake", fake)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise DataError(f"KID needs (N >= 2, D) {name} features, got {tuple(f.shape)}")
        if not torch.isfinite(f).all():
            raise DataError(f"KID: the {name} features hold NaN or inf values")
    if real.shape[1] != fake.shape[1]:
        raise DataError(f"KID feature sizes differ: {real.shape[1]} vs {fake.shape[1]}")
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features"
        metric = KernelInceptionDistance(
            feature=nn.Identity(), subsets=subsets, subset_size=size, gamma=gamma
        )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


def kid_gamma(real: torch.Tensor) -> float:
    """gamma = 1 / (mean squared norm of the real features): x.y gamma is O(1) at any scale."""
    return 1.0 / float(real.double().pow(2).sum(dim=1).mean())
