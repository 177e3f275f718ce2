"""Baselines that map an embedding to a LoRA without a generative model.

- "pca" (weights2weights-style): the top-k principal directions V of the standardised
  collection X (N x D), the coefficients C = X V^T of every LoRA, and a ridge regression
  from the embedding to C:  W = (Ec^T Ec + lambda I)^-1 Ec^T Cc  with Ec, Cc centred. A new
  embedding e gives x = ((e - mean_e) W + mean_c) V, un-standardised afterwards.
- "nearest": the collection's LoRA whose embedding has the largest cosine with e, exactly
  as stored (the model folder keeps a copy of the collection).

PCA streams X in row chunks (a randomized SVD, Halko et al. 2011, Alg. 4.4 with power
iterations), so the N x D matrix never needs to be in memory.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from condlora.core.errors import DataError
from condlora.core.safetensors_io import read_weights, write_weights
from condlora.synthesis.collection import LoRADataset
from condlora.synthesis.config import BaselineConfig

BASELINE_FORMAT = "condlora.synth_baseline"
Chunks = Callable[[], Iterable[Tensor]]  # a fresh pass over X: (rows, D) float64 chunks


def _product(chunks: Chunks, right: Tensor) -> Tensor:
    """X @ right, chunk by chunk: (N, q)."""
    return torch.cat([c @ right for c in chunks()])


def _transposed_product(chunks: Chunks, left: Tensor) -> Tensor:
    """X^T @ left for left (N, q), chunk by chunk: (D, q)."""
    total, first = None, 0
    for c in chunks():
        part = c.T @ left[first : first + len(c)]
        total = part if total is None else total + part
        first += len(c)
    return total


def streamed_pca(
    chunks: Chunks, n: int, d: int, k: int, oversample: int = 16, iters: int = 4, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """(components (k, D) orthonormal rows, singular values (k,)) of X from row chunks.

    Randomized range finder with power iterations: Y = (X X^T)^iters X Omega, Q = orth(Y),
    then the SVD of the small Q^T X. Exact when k + oversample >= rank(X).
    """
    q = min(k + oversample, n, d)
    omega = torch.randn(d, q, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = _product(chunks, omega)
    for _ in range(iters):  # re-orthonormalise between products (Halko et al. Alg. 4.4)
        z = _transposed_product(chunks, torch.linalg.qr(y).Q)
        y = _product(chunks, torch.linalg.qr(z).Q)
    basis = torch.linalg.qr(y).Q  # (N, q)
    small = _transposed_product(chunks, basis).T  # Q^T X: (q, D)
    _, s, vt = torch.linalg.svd(small, full_matrices=False)
    k = min(k, q)
    return vt[:k], s[:k]


@dataclass
class PCARidge:
    """Principal directions and a ridge map from embeddings to their coefficients."""

    components: Tensor  # (k, D) orthonormal rows, in standardised coordinates
    coef_map: Tensor  # (E, k) ridge weights W
    emb_mean: Tensor  # (E,) mean embedding of the collection
    coef_mean: Tensor  # (k,) mean coefficients of the collection

    def predict(self, embeddings: Tensor) -> Tensor:
        """Standardised vectors (N, D) for embeddings (N, E)."""
        e = embeddings.double() - self.emb_mean.double()
        coefs = e @ self.coef_map.double() + self.coef_mean.double()
        return (coefs @ self.components.double()).float()

    def write(self, path: Path) -> None:
        """Save to a safetensors file (float64)."""
        tensors = {k: v.double() for k, v in vars(self).items()}
        write_weights(path, tensors, {"format": BASELINE_FORMAT, "method": "pca"})

    @classmethod
    def read(cls, path: Path) -> PCARidge:
        """Load from `write`'s file; DataError if it is not one."""
        _, tensors = read_weights(path, BASELINE_FORMAT, "PCA baseline file", DataError)
        return cls(**tensors)


def standardised_chunks(
    dataset: LoRADataset, standardise: Callable[[Tensor], Tensor], rows: int = 256
) -> Chunks:
    """A function that makes one pass over the standardised collection, in float64 chunks."""

    def chunks() -> Iterable[Tensor]:
        for _, chunk in dataset.chunks(rows):
            yield standardise(torch.from_numpy(np.array(chunk))).double()

    return chunks


def collection_embeddings(dataset: LoRADataset) -> Tensor:
    """The dataset's embeddings (N, E); DataError if it has none."""
    if dataset.embeddings is None:
        raise DataError(
            f"{dataset.path} holds no embeddings: collect it with --embeddings FILE "
            "(a conditional model needs one embedding per LoRA)"
        )
    return torch.from_numpy(np.array(dataset.embeddings))


def fit_pca_ridge(
    dataset: LoRADataset, standardise: Callable[[Tensor], Tensor], cfg: BaselineConfig
) -> PCARidge:
    """Fit the PCA + ridge baseline on a collection (standardised by `standardise`)."""
    emb = collection_embeddings(dataset).double()
    chunks = standardised_chunks(dataset, standardise)
    n, d = len(dataset), dataset.dim
    components, _ = streamed_pca(chunks, n, d, cfg.components, cfg.oversample, cfg.power_iters)
    coefs = _product(chunks, components.T)  # (N, k)
    emb_mean, coef_mean = emb.mean(0), coefs.mean(0)
    ec, cc = emb - emb_mean, coefs - coef_mean
    gram = ec.T @ ec + cfg.ridge * torch.eye(emb.shape[1], dtype=torch.float64)
    coef_map = torch.linalg.solve(gram, ec.T @ cc)  # ridge normal equations
    return PCARidge(components, coef_map, emb_mean, coef_mean)


class Nearest:
    """The nearest LoRA of a collection by embedding cosine, read from its memory-mapped file."""

    def __init__(self, path: Path) -> None:
        self.collection = LoRADataset(path)
        self.unit = F.normalize(collection_embeddings(self.collection).float(), dim=1)

    @staticmethod
    def copy_collection(dataset: LoRADataset, path: Path) -> None:
        """Keep a copy of the collection (temporary name, then rename)."""
        tmp = path.with_name(path.name + ".tmp")
        shutil.copyfile(dataset.path, tmp)
        tmp.replace(path)

    def indices(self, embeddings: Tensor, num: int = 1) -> Tensor:
        """(N, num) rows of the `num` most similar LoRAs per embedding, best first."""
        if num > len(self.collection):
            raise DataError(f"--num {num}: the collection holds only {len(self.collection)} LoRAs")
        cos = F.normalize(embeddings.float(), dim=1) @ self.unit.T
        return cos.topk(num, dim=1).indices

    def vectors(self, embeddings: Tensor, num: int = 1) -> Tensor:
        """The nearest LoRAs' vectors exactly as collected, (N, num, D)."""
        idx = self.indices(embeddings, num)
        rows = [self.collection.row(int(i)) for i in idx.reshape(-1)]
        return torch.stack(rows).reshape(*idx.shape, -1)
