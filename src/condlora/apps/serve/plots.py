"""The page's two figures (matplotlib, no pyplot state): where a subject's embedding lies
among the training subjects, and a TimeLoRA composition table as a heat map."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure
from torch import Tensor


def pca_2d(train: Tensor) -> tuple[Tensor, Tensor]:
    """(mean (E,), components (2, E)): the top two principal directions of the rows."""
    x = train.double()
    mean = x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    components = vh[:2]
    if len(components) < 2:  # fewer than two distinct directions: pad with zeros
        components = torch.cat([components, torch.zeros(2 - len(components), x.shape[1])])
    return mean, components


def project(points: Tensor, mean: Tensor, components: Tensor) -> Tensor:
    """(N, 2) coordinates of rows (N, E) in the plane of `pca_2d`."""
    return (points.double() - mean) @ components.T


def embedding_figure(
    train: Tensor,
    colour: Tensor,
    heldout: Tensor,
    query: Tensor | None,
    label: str,
) -> Figure:
    """Training subjects (coloured by `colour`, e.g. stroke thickness), held-out subjects and
    the query, in the plane of the training embeddings' first two principal components."""
    mean, components = pca_2d(train)
    fig = Figure(figsize=(4.6, 4.0), dpi=100)
    ax = fig.subplots()
    xy = project(train, mean, components)
    dots = ax.scatter(
        xy[:, 0], xy[:, 1], c=colour.tolist(), cmap="viridis", s=14, label="training subjects"
    )
    fig.colorbar(dots, ax=ax, label="stroke thickness")
    if len(heldout):
        held = project(heldout, mean, components)
        ax.scatter(held[:, 0], held[:, 1], marker="x", c="grey", s=18, label="held-out")
    if query is not None:
        q = project(query[None], mean, components)[0]
        ax.scatter([q[0]], [q[1]], marker="*", c="red", s=220, edgecolors="black", label=label)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("subject embeddings (PCA of the training subjects)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    fig.tight_layout()
    return fig


def table_figure(table: Tensor, title: str) -> Figure:
    """A TimeLoRA table Omega (T, m) as a heat map: time downwards, one column per basis."""
    fig = Figure(figsize=(4.6, 3.6), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(
        table.detach().float().cpu().numpy(),
        aspect="auto",
        cmap="magma",
        interpolation="nearest",
        extent=(-0.5, table.shape[1] - 0.5, 1.0, 0.0),
    )
    fig.colorbar(image, ax=ax, label="basis weight w_i(t)")
    ax.set_xlabel("basis i")
    ax.set_ylabel("normalised time t (0: least noise)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
