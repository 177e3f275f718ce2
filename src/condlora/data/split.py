"""A seeded, stratified train / held-out split for any labelled image set."""

import torch

from condlora.core.errors import DataError


def stratified_split(
    images: torch.Tensor,
    labels: torch.Tensor,
    holdout: int = 297,
    seed: int = 0,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Stratified random split -> ((train_x, train_y), (hold_x, hold_y)); digits: 1500/297.

    Each class gives holdout * n_class / N held-out images (largest remainders round, ties to
    the lower class), drawn with a seeded torch.Generator; both parts keep the input order.
    """
    n = len(labels)
    if len(images) != n:
        raise DataError(f"{len(images)} images but {n} labels")
    if not 0 <= holdout <= n:
        raise DataError(f"holdout must be in [0, {n}], got {holdout}")
    labels = labels.long()
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * holdout / n
    take = quota.floor().long()
    remainder = holdout - int(take.sum())
    order = sorted(range(len(classes)), key=lambda i: (-(quota[i] - take[i]).item(), i))
    for i in order[:remainder]:
        take[i] += 1

    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(n, dtype=torch.bool)
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        members = torch.nonzero(labels == c).flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[:k]]
        held[chosen] = True
    return (images[~held], labels[~held]), (images[held], labels[held])
