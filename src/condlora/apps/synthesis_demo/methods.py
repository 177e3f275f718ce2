"""Methods that write a LoRA for a held-out subject from its embedding: a plug-in interface.

A method is fitted once on the training collection (`DemoData`) with a seed, and returns a
generator from embeddings to LoRA vectors:

    generate = method.fit(data, seed)        # may train models in data.work_dir / method.name
    vectors = generate(data.queries)         # [M, E] -> [M, D] canonical, un-standardised

Vectors are canonical LoRA vectors in `data.spec`'s layout (scale folded into B), the rows
that `collect` writes. Here: the references "fine-tuned" (each held-out subject's own zoo
LoRA: the ceiling) and "no LoRA" (the floor), and two simple predictors, "nearest" and
"pca-ridge". The generative models (`generative.py`) plug in the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from condlora.synthesis.bigfile import StreamWriter
from condlora.synthesis.collection import FORMAT, LoRADataset
from condlora.synthesis.flatten import FlatSpec

Generate = Callable[[Tensor], Tensor]  # [M, E] embeddings -> [M, D] canonical vectors


@dataclass(frozen=True)
class DemoData:
    """What a method may use: the training collection and the held-out subjects' embeddings."""

    dataset: Path  # the training collection as a `collect` dataset file (with embeddings)
    vectors: Tensor  # [N, D] its canonical vectors
    embeddings: Tensor  # [N, E] the training subjects' embeddings, row-aligned
    mean: Tensor  # [D] per-coordinate mean over the N rows
    std: Tensor  # [D] per-coordinate (population) std over the N rows
    spec: FlatSpec  # the layout of a vector
    names: list[str]  # the training subjects, row-aligned
    queries: Tensor  # [M, E] reference embeddings of the held-out subjects
    work_dir: Path  # where methods keep what they train (a subfolder per method and size)

    @classmethod
    def load(cls, dataset: str | Path, queries: Tensor, work_dir: str | Path) -> DemoData:
        """The rows of a dataset file in memory, with the queries."""
        ds = LoRADataset(dataset)
        return cls(
            dataset=Path(dataset),
            vectors=torch.from_numpy(np.array(ds.vectors)),
            embeddings=torch.from_numpy(np.array(ds.embeddings)),
            mean=ds.mean,
            std=ds.std,
            spec=ds.spec,
            names=list(ds.names),
            queries=queries,
            work_dir=Path(work_dir),
        )

    @property
    def size(self) -> int:
        """Number of training subjects."""
        return len(self.names)

    def subset(self, n: int) -> DemoData:
        """The first n training subjects, with their own statistics and dataset file."""
        if n >= self.size:
            return self
        vectors, embeddings = self.vectors[:n], self.embeddings[:n]
        mean = vectors.double().mean(dim=0)
        std = (vectors.double() - mean).square().mean(dim=0).sqrt()
        work_dir = self.work_dir / f"train-{n}"
        work_dir.mkdir(parents=True, exist_ok=True)
        path = work_dir / "dataset.safetensors"
        write_dataset(
            path, self.names[:n], self.spec, vectors, mean.float(), std.float(), embeddings
        )
        return replace(
            self,
            dataset=path,
            vectors=vectors,
            embeddings=embeddings,
            mean=mean.float(),
            std=std.float(),
            names=self.names[:n],
            work_dir=work_dir,
        )


def write_dataset(
    path: Path,
    names: list[str],
    spec: FlatSpec,
    vectors: Tensor,
    mean: Tensor,
    std: Tensor,
    embeddings: Tensor,
) -> None:
    """A dataset file in `collect`'s format from rows in memory (written atomically)."""
    metadata = {"format": FORMAT, "names": json.dumps(names), "spec": spec.to_json()}
    metadata["skipped"] = "[]"
    layout = [
        ("vectors", tuple(vectors.shape)),
        ("mean", tuple(mean.shape)),
        ("std", tuple(std.shape)),
        ("embeddings", tuple(embeddings.shape)),
    ]
    with StreamWriter(path, layout, metadata) as writer:
        for tensor in (vectors, mean, std, embeddings):
            writer.write(tensor.float().numpy())


@dataclass(frozen=True)
class Method:
    """A named way to write LoRAs for held-out subjects."""

    name: str
    fit: Callable[[DemoData, int], Generate]  # (training data, seed) -> generator
    on_curve: bool = True  # also scored against the collection's size (False: references that
    # do not learn from it, and costly variants kept off the curve to save time)
    seconds_per_lora: float | None = None  # a known cost per LoRA instead of timing `generate`
    # the training stages `fit` would run, for running them ahead in parallel (generative.py);
    # then `fit` only loads, and `train_seconds` reads back what the training took
    stages: Callable[[DemoData, int], list] | None = None
    train_seconds: Callable[[DemoData, int], float] | None = None


def nearest(data: DemoData, seed: int) -> Generate:
    """The training LoRA whose subject's embedding has the highest cosine with the query."""
    keys = torch.nn.functional.normalize(data.embeddings, dim=1)

    def generate(queries: Tensor) -> Tensor:
        best = (torch.nn.functional.normalize(queries, dim=1) @ keys.T).argmax(dim=1)
        return data.vectors[best].clone()

    return generate


RIDGE_LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def ridge_weights(x: Tensor, y: Tensor, lam: float) -> Tensor:
    """W = (X^T X + lambda I)^-1 X^T Y (no intercept: centre x and y first)."""
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(x.T @ x + lam * eye, x.T @ y)


def loo_residuals(x: Tensor, y: Tensor, lam: float) -> Tensor:
    """Leave-one-out residuals of ridge in closed form: e_i / (1 - h_ii),
    H = X (X^T X + lambda I)^-1 X^T (the PRESS identity)."""
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    inverse = torch.linalg.inv(x.T @ x + lam * eye)
    leverage = ((x @ inverse) * x).sum(dim=1)
    return (y - x @ (inverse @ x.T @ y)) / (1 - leverage).clamp(min=1e-9)[:, None]


def ridge_fit(x: Tensor, y: Tensor, lambdas: tuple[float, ...] = RIDGE_LAMBDAS) -> Tensor:
    """Ridge weights ([E, K]) of centred y on centred x, lambda by the least LOO error."""
    x, y = x.double(), y.double()
    best = min(lambdas, key=lambda lam: float(loo_residuals(x, y, lam).square().sum()))
    return ridge_weights(x, y, best)


def pca_ridge(components: int = 32) -> Callable[[DemoData, int], Generate]:
    """weights2weights-style: PCA of the standardised vectors, ridge from the embedding."""

    def fit(data: DemoData, seed: int) -> Generate:
        std = torch.where(data.std > 0, data.std, torch.ones_like(data.std)).double()
        z = (data.vectors.double() - data.mean.double()) / std  # [N, D], columns centred
        k = max(1, min(components, data.size - 1))
        _, _, vh = torch.linalg.svd(z, full_matrices=False)
        basis = vh[:k]  # [k, D] principal directions
        coefficients = z @ basis.T  # [N, k]
        e_mean = data.embeddings.double().mean(dim=0)
        w = ridge_fit(data.embeddings.double() - e_mean, coefficients)

        def generate(queries: Tensor) -> Tensor:
            c = (queries.double() - e_mean) @ w  # the coefficients' mean is 0
            return (data.mean.double() + std * (c @ basis)).float()

        return generate

    return fit


def no_lora() -> Method:
    """The floor: the base model alone (a zero LoRA)."""

    def fit(data: DemoData, seed: int) -> Generate:
        return lambda queries: torch.zeros(len(queries), data.spec.size)

    return Method("no LoRA", fit, on_curve=False)


def finetuned(vectors: dict[int, Tensor], seconds_per_lora: float) -> Method:
    """The ceiling: each scored subject's own fine-tuned zoo LoRA, by the seed whose split
    scores it (rows aligned with that seed's queries)."""
    return Method(
        "fine-tuned", lambda data, seed: lambda q: vectors[seed].clone(), False, seconds_per_lora
    )


def simple_methods() -> list[Method]:
    """The predictors that need no training loop: PCA + ridge, and the nearest LoRA."""
    return [Method("pca-ridge", pca_ridge()), Method("nearest", nearest)]
