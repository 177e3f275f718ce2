"""Class conditions as weights: the one reading of a class label that every module shares.

Integer labels (B,) become one-hot rows; float class weights (B, K) pass through, so
mixtures, scaled one-hots (interpolation, extrapolation) and the all-zero null class of
classifier-free guidance work wherever a class label does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from condlora.core.errors import CondloraError


def class_weights(y: Tensor | int, num_classes: int) -> Tensor:
    """Class indices (B,) -> one-hot float (B, K); float weights (K,) or (B, K) pass as given."""
    y = torch.as_tensor(y)
    if y.is_floating_point():
        if y.dim() == 1:
            y = y[None]
        if y.dim() != 2 or y.shape[1] != num_classes:
            raise CondloraError(
                f"float class weights y must have shape (batch, {num_classes}), "
                f"got {tuple(y.shape)}"
            )
        return y
    if y.dim() > 1:
        raise CondloraError(f"class indices y must have shape (batch,), got {tuple(y.shape)}")
    y = y.reshape(-1).long()
    # scatter instead of F.one_hot: no host sync (callers check the range once, if at all)
    return torch.zeros(len(y), num_classes, device=y.device).scatter_(1, y[:, None], 1.0)
