"""A small CNN digit classifier: judges class accuracy and gives features for the FD.

Trained on the real digits (`condlora.data`), it scores generated digits: are they the
requested class, and how far is their feature distribution from the real one
(`digits_metrics`).
"""

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from condlora.core.errors import DataError
from condlora.core.reporting import progress_bar
from condlora.core.safetensors_io import load_state_checked, read_weights, write_weights
from condlora.metrics.reference import frechet_of_features

FEATURE_DIM = 128
FORMAT = "condlora.digits_classifier"


class DigitsClassifier(nn.Module):
    """Conv-Pool, Conv-Conv-Pool, pool to 4x4, Linear -> 128 features, Linear -> 10 logits."""

    def __init__(
        self,
        resolution: int = 16,  # input H = W, a multiple of 8
        width: int = 16,  # channels of the first conv (second stage: 2x)
        num_classes: int = 10,  # logits
    ) -> None:
        super().__init__()
        if resolution < 8 or resolution % 8:
            raise DataError(f"classifier resolution must be a multiple of 8, got {resolution}")
        self.resolution = resolution
        self.config = {"resolution": resolution, "width": width, "num_classes": num_classes}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),  # R/2
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),  # R/4
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, FEATURE_DIM),
            nn.SiLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, R, R) images in [-1, 1] -> (B, 128) penultimate features."""
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-2:] != (self.resolution,) * 2:
            raise DataError(
                f"classifier expects (B, 1, {self.resolution}, {self.resolution}), "
                f"got {tuple(x.shape)}"
            )
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, R, R) images in [-1, 1] -> (B, 10) logits."""
        return self.head(self.features(x))


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by a random whole number of pixels in [-max_shift, max_shift]^2."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # background is -1
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]  # (B, 1, W)
    batch = torch.arange(b)[:, None, None]
    return padded[:, 0][batch, rows, cols][:, None]


def train_digits_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 600,
    seed: int = 0,
    batch_size: int = 128,
    progress: bool | dict = False,
) -> DigitsClassifier:
    """Train a DigitsClassifier (AdamW, linear LR decay, 1-px shifts); returns it in eval mode.

    Seeded: same data, seed and thread count give the same weights. The global RNG is left
    as it was. The wall time of the loop is kept in `model.train_seconds`.
    """
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[-1] != images.shape[-2]:
        raise DataError(f"expected (N, 1, R, R) images, got {tuple(images.shape)}")
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} labels")
    images = images.detach().to("cpu", torch.float32)
    labels = labels.detach().to("cpu", torch.long)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier(resolution=images.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    start = time.perf_counter()
    with progress_bar(progress, total=steps, desc="digits classifier", unit="step") as bar:
        for _ in range(steps):
            index = torch.randint(0, len(images), (batch_size,), generator=generator)
            x = random_shift(images[index], generator)
            loss = F.cross_entropy(model(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
    model.train_seconds = time.perf_counter() - start
    return model.eval()


def save_classifier(model: DigitsClassifier, path: str | Path) -> None:
    """Write weights to a safetensors file; the constructor config goes in its metadata."""
    metadata = {"format": FORMAT, "config": json.dumps(model.config)}
    metadata["resolution"] = str(model.resolution)
    write_weights(path, model.state_dict(), metadata)


def load_classifier(path: str | Path) -> DigitsClassifier:
    """Rebuild a DigitsClassifier from a file written by save_classifier (eval mode, CPU)."""
    metadata, state = read_weights(path, FORMAT, "digits classifier file", DataError)
    try:
        config = json.loads(metadata["config"])
        model = DigitsClassifier(
            **{k: int(config[k]) for k in ("resolution", "width", "num_classes")}
        )
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: malformed classifier metadata ({err})") from None
    load_state_checked(model, state, str(path), DataError)
    return model.eval()


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
