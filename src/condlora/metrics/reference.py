"""Reference statistics of real features, cached in a safetensors file, and the distances to them.

One file per (data set, feature network, resolution): the Gaussian statistics that FD needs,
the raw features that KID needs (a seeded subset when there are very many), and the
real-to-real floor (FD and KID between disjoint random halves of the real set). A `key`
stored beside them says what they were computed from; a file whose key differs is stale.
Distances between feature sets go through torchmetrics: Frechet (FID's) and kernel (KID).
condlora extracts the features itself (the digits CNN, or its port of the FID Inception-v3);
`PrecomputedFeatures` is the identity as torchmetrics' feature network.

KID (Binkowski et al. 2018) is the unbiased squared MMD with the cubic polynomial kernel
k(x, y) = (gamma x.y + 1)^3, gamma = 1 / d by default, averaged over random subsets of both
sets. Unlike FD it has no bias at small set sizes, so it is a useful second opinion on a few
thousand samples. gamma = 1 / d suits Inception features (small non-negative values);
features of larger scale make the cubic kernel huge and its estimate mostly noise, so
`kid_gamma` gives the scale-free choice gamma = 1 / E|x|^2 over the real features.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from condlora.core.errors import DataError
from condlora.core.safetensors_io import read_weights, write_weights


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


FORMAT = "condlora.reference_stats"
KID_MAX_REAL = 10_000  # real features kept for KID (a seeded subset beyond this)
FLOOR_SPLITS = 20  # random halvings averaged for the FD floor (features of <= 256 dims)
FLOOR_SPLITS_WIDE = 2  # the same for wider features (a 2048-d sqrtm takes many seconds)
FLOOR_KID_SUBSETS = 10  # KID subsets for the floor (a half is about one subset: few are enough)


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), both float64."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise DataError(f"need (N >= 2, D) features, got shape {features.shape}")
    check_finite(features)
    mu = features.mean(axis=0)
    sigma = np.atleast_2d(np.cov(features, rowvar=False, ddof=1))
    return mu, sigma


@dataclass
class Reference:
    """Real-data statistics for one feature network."""

    mu: np.ndarray  # (D,) float64 mean of all real features
    sigma: np.ndarray  # (D, D) float64 covariance of all real features
    kid_features: torch.Tensor  # (M, D) float32 real features for KID (M <= KID_MAX_REAL)
    num_real: int  # real images behind mu and sigma
    floor: dict  # real-to-real FD / KID between disjoint halves (see `real_floor`)
    key: dict  # what the statistics were computed from (data set, feature, resolution, ...)
    kid_gamma: float | None = None  # KID kernel scale (None: 1 / D)


def real_floor(
    features: torch.Tensor,
    splits: int | None = None,
    seed: int = 0,
    gamma: float | None = None,
) -> dict:
    """Real vs real: FD over `splits` random halvings (default by width), KID on the first."""
    splits = splits or (FLOOR_SPLITS if features.shape[1] <= 256 else FLOOR_SPLITS_WIDE)
    n = len(features)
    if n < 4:
        raise DataError(f"the real-to-real floor needs at least 4 real images, got {n}")
    half = n // 2
    generator = torch.Generator().manual_seed(seed)
    fds, halves = [], None
    for _ in range(splits):
        perm = torch.randperm(n, generator=generator)
        a, b = features[perm[:half]], features[perm[half:]]
        if halves is None:
            halves = (a, b)
        fds.append(frechet_of_features(a, b))
    kid_mean, kid_std, _ = kid_from_features(
        *halves, subsets=FLOOR_KID_SUBSETS, seed=seed, gamma=gamma
    )
    return {
        "fd_floor": float(np.mean(fds)),
        "fd_floor_std": float(np.std(fds)),
        "fd_floor_sizes": [half, n - half],
        "fd_floor_splits": splits,
        "kid_floor_mean": kid_mean,
        "kid_floor_std": kid_std,
    }


def floor_at_sizes(floor: dict, num_a: int, num_b: int) -> float:
    """The FD floor rescaled to set sizes (num_a, num_b), taking FD's bias as ~ 1/Na + 1/Nb.

    An estimate: FD between two samples of one distribution shrinks about like 1/N, so the
    halves' value is scaled by (1/Na + 1/Nb) / (1/h1 + 1/h2).
    """
    h1, h2 = floor["fd_floor_sizes"]
    return floor["fd_floor"] * (1 / num_a + 1 / num_b) / (1 / h1 + 1 / h2)


def reference_from_features(
    features: torch.Tensor, key: dict, seed: int = 0, scale_kid: bool = False
) -> Reference:
    """Statistics, KID subset and floor of all real features (N, D).

    scale_kid: KID's gamma from the real features' scale (`kid_gamma`) instead of 1 / D.
    """
    features = features.detach().cpu().double()
    mu, sigma = gaussian_stats(features)
    kid = features
    if len(features) > KID_MAX_REAL:
        generator = torch.Generator().manual_seed(seed)
        kid = features[torch.randperm(len(features), generator=generator)[:KID_MAX_REAL]]
    gamma = kid_gamma(features) if scale_kid else None
    floor = real_floor(features, seed=seed, gamma=gamma)
    return Reference(mu, sigma, kid.float(), len(features), floor, dict(key), gamma)


def save_reference(path: str | Path, ref: Reference) -> None:
    """Write a Reference as safetensors (arrays as tensors, key and floor as JSON metadata)."""
    tensors = {
        "mu": torch.from_numpy(ref.mu),
        "sigma": torch.from_numpy(ref.sigma),
        "kid_features": ref.kid_features,
    }
    metadata = {
        "format": FORMAT,
        "num_real": str(ref.num_real),
        "floor": json.dumps(ref.floor),
        "key": json.dumps(ref.key, sort_keys=True),
        "kid_gamma": json.dumps(ref.kid_gamma),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_weights(path, tensors, metadata)


def load_reference(path: str | Path) -> Reference:
    """Read a file written by save_reference."""
    meta, t = read_weights(path, FORMAT, "reference statistics file", DataError)
    try:
        ref = Reference(
            mu=t["mu"].double().numpy(),
            sigma=t["sigma"].double().numpy(),
            kid_features=t["kid_features"],
            num_real=int(meta["num_real"]),
            floor=json.loads(meta["floor"]),
            key=json.loads(meta["key"]),
            kid_gamma=json.loads(meta.get("kid_gamma", "null")),
        )
    except (KeyError, TypeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise DataError(f"{path}: malformed reference statistics ({err})") from None
    d = ref.mu.shape
    if len(d) != 1 or ref.sigma.shape != d * 2 or ref.kid_features.shape[1:] != d:
        raise DataError(f"{path}: reference statistics of inconsistent shapes")
    return ref
