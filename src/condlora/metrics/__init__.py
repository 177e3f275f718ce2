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
