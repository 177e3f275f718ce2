"""Frechet distance between Gaussians fitted to features (FID on any feature extractor)."""

import warnings

import numpy as np
import torch
from scipy import linalg

from condlora.core.errors import DataError

NONFINITE_FEATURES = (
    "features hold NaN or inf values (diverged samples?): refusing to compute a distance"
)


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), both float64."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise DataError(f"need (N >= 2, D) features, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise DataError(NONFINITE_FEATURES)
    mu = features.mean(axis=0)
    sigma = np.atleast_2d(np.cov(features, rowvar=False, ddof=1))
    return mu, sigma


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    The matrix square root is scipy's sqrtm; if it is not finite or has a non-negligible
    imaginary part (near-singular covariances), both covariances get eps * I added and it is
    taken again. Tiny imaginary parts are discarded.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise DataError(f"mismatched statistics: {mu1.shape}/{mu2.shape}, {sigma1.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise DataError(NONFINITE_FEATURES)  # before sqrtm, which can crash on NaN

    def sqrt_product(offset: float) -> np.ndarray:
        eye = np.eye(len(sigma1)) * offset
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return linalg.sqrtm((sigma1 + eye) @ (sigma2 + eye))

    def usable(m: np.ndarray) -> bool:
        return bool(np.isfinite(m).all()) and (
            not np.iscomplexobj(m) or np.abs(m.imag).max() <= 1e-3 * max(1.0, np.abs(m).max())
        )

    covmean = sqrt_product(0.0)
    if not usable(covmean):
        covmean = sqrt_product(eps)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
