"""condlora.metrics: digits classifier, Frechet distance, FID Inception, KID, cached real stats."""

from condlora.metrics.classifier import (
    DigitsClassifier,
    class_accuracy,
    classifier_outputs,
    digits_metrics,
    load_classifier,
    save_classifier,
    train_digits_classifier,
)

__all__ = [
    "DigitsClassifier",
    "class_accuracy",
    "classifier_outputs",
    "digits_metrics",
    "load_classifier",
    "save_classifier",
    "train_digits_classifier",
]

from condlora.metrics.inception import FIDInception, load_fid_inception  # noqa: E402
from condlora.metrics.reference import (  # noqa: E402
    frechet_of_features,
    frechet_to_stats,
)

__all__ += [
    "FIDInception",
    "frechet_of_features",
    "frechet_to_stats",
    "load_fid_inception",
]

from condlora.metrics.reference import (  # noqa: E402  # noqa: E402
    Reference,
    floor_at_sizes,
    gaussian_stats,
    kid_from_features,
    kid_gamma,
    load_reference,
    reference_from_features,
    save_reference,
)

__all__ += [
    "Reference",
    "floor_at_sizes",
    "gaussian_stats",
    "kid_from_features",
    "kid_gamma",
    "load_reference",
    "reference_from_features",
    "save_reference",
]
