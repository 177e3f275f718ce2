"""condlora.metrics: digits classifier, Frechet distance, FID Inception, KID, cached real stats."""

from condlora.metrics.classifier import (
    DigitsClassifier,
    load_classifier,
    save_classifier,
    train_digits_classifier,
)
from condlora.metrics.digits import class_accuracy, classifier_outputs, digits_metrics
from condlora.metrics.frechet import frechet_distance, gaussian_stats

__all__ = [
    "DigitsClassifier",
    "class_accuracy",
    "classifier_outputs",
    "digits_metrics",
    "frechet_distance",
    "gaussian_stats",
    "load_classifier",
    "save_classifier",
    "train_digits_classifier",
]

from condlora.metrics.fid import (  # noqa: E402
    FeatureAdapter,
    frechet_distance_of,
    frechet_metric,
    frechet_of_features,
    frechet_to_stats,
)
from condlora.metrics.inception import FIDInception, load_fid_inception  # noqa: E402

__all__ += [
    "FIDInception",
    "FeatureAdapter",
    "frechet_distance_of",
    "frechet_metric",
    "frechet_of_features",
    "frechet_to_stats",
    "load_fid_inception",
]

from condlora.metrics.kid import kid_from_features, kid_gamma  # noqa: E402
from condlora.metrics.reference import (  # noqa: E402
    Reference,
    floor_at_sizes,
    load_reference,
    reference_from_features,
    save_reference,
)

__all__ += [
    "Reference",
    "floor_at_sizes",
    "kid_from_features",
    "kid_gamma",
    "load_reference",
    "reference_from_features",
    "save_reference",
]
