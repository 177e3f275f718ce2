"""condlora.metrics: a digits classifier, Frechet distance on its features, class accuracy."""

from condlora.metrics.classifier import (
    DigitsClassifier,
    load_classifier,
    save_classifier,
    train_digits_classifier,
)
from condlora.metrics.digits import classifier_outputs, digits_metrics
from condlora.metrics.frechet import frechet_distance, gaussian_stats

__all__ = [
    "DigitsClassifier",
    "classifier_outputs",
    "digits_metrics",
    "frechet_distance",
    "gaussian_stats",
    "load_classifier",
    "save_classifier",
    "train_digits_classifier",
]

from condlora.metrics.fid import FeatureAdapter, frechet_distance_of, frechet_metric  # noqa: E402
from condlora.metrics.inception import FIDInception, load_fid_inception  # noqa: E402

__all__ += [
    "FIDInception",
    "FeatureAdapter",
    "frechet_distance_of",
    "frechet_metric",
    "load_fid_inception",
]
