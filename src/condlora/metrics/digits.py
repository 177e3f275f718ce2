"""Digits metrics: class accuracy and Frechet distance on DigitsClassifier features."""

import torch

from condlora.core.errors import DataError
from condlora.metrics.classifier import DigitsClassifier
from condlora.metrics.fid import frechet_of_features


@torch.no_grad()
def classifier_outputs(
    classifier: DigitsClassifier, images: torch.Tensor, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (clamped to [-1, 1]) -> (features (N, 128), logits (N, 10)) on the CPU."""
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    features, logits = [], []
    for chunk in images.split(batch_size):
        f = classifier.features(chunk.to(device, torch.float32).clamp(-1.0, 1.0))
        features.append(f.cpu())
        logits.append(classifier.head(f).cpu())
    classifier.train(was_training)
    return torch.cat(features), torch.cat(logits)


def digits_metrics(
    classifier: DigitsClassifier,
    samples: torch.Tensor,
    labels: torch.Tensor | None,
    reference: torch.Tensor,
) -> dict:
    """{"class_accuracy", "frechet_distance"} of generated samples against reference images.

    class_accuracy: fraction of samples classified as their requested label (labels long (N,),
    or (N, 10) weights read by argmax); None when labels is None. frechet_distance: FD between
    Gaussians fitted to classifier features of samples and of reference. Images are clamped to
    [-1, 1] first, as they would be when saved.
    """
    if labels is not None and len(labels) != len(samples):
        raise DataError(f"{len(samples)} samples but {len(labels)} labels")
    sample_features, logits = classifier_outputs(classifier, samples)
    reference_features, _ = classifier_outputs(classifier, reference)
    accuracy = None if labels is None else class_accuracy(logits, labels)
    fd = frechet_of_features(reference_features, sample_features)
    return {"class_accuracy": accuracy, "frechet_distance": fd}


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax is the requested class (long (N,) or (N, K) weights)."""
    wanted = labels.argmax(dim=1) if labels.ndim == 2 else labels
    return (logits.argmax(dim=1) == wanted.cpu().long()).double().mean().item()
