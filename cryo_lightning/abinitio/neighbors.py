"""Nearest neighbours in a feature space, and class centres whose neighbourhoods overlap little.

Similarity is the cosine of the feature vectors (e.g. the rotation-invariant features of
:mod:`cryo_lightning.abinitio.invariant_features`); a class is an image and its ``k - 1`` most
similar images (:mod:`cryo_lightning.abinitio.class_average`).
"""

from __future__ import annotations

import math

import torch

__all__ = ["nearest_neighbors", "select_centres"]


def nearest_neighbors(
    features: torch.Tensor, k: int, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar images of each image by cosine similarity, itself first.

    Args:
        features: ``(N, F)``.
        k: neighbours per image, including itself (``k <= N``).
        chunk: rows of the similarity matrix per pass (memory ``chunk * N``).
    Returns:
        ``(indices, similarities)``: ``(N, k)`` int64 (column 0 is the image itself) and
        ``(N, k)`` cosine similarities, decreasing along each row after the first column.
    """
    N = features.shape[0]
    if not 1 <= k <= N:
        raise ValueError(f"k must be in [1, {N}], got {k}")
    f = features / features.norm(dim=1, keepdim=True).clamp_min(torch.finfo(features.dtype).tiny)
    indices, sims = [], []
    for s in range(0, N, chunk):
        rows = torch.arange(s, min(s + chunk, N), device=f.device)
        sim = f[rows] @ f.T
        self_sim = sim[torch.arange(len(rows)), rows].clone()
        sim[torch.arange(len(rows)), rows] = math.inf  # self first, even among exact duplicates
        val, idx = torch.topk(sim, k, dim=1)
        val[:, 0] = self_sim
        indices.append(idx)
        sims.append(val)
    return torch.cat(indices), torch.cat(sims)


def select_centres(neighbors: torch.Tensor, similarities: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy choice of ``n`` class centres whose classes overlap little.

    Images are visited by decreasing mean similarity to their neighbours (tight classes first);
    an image becomes a centre unless it already belongs to a chosen class. If that yields fewer
    than ``n`` centres, the remaining images are taken in the same order.

    Args:
        neighbors, similarities: ``(N, k)`` from :func:`nearest_neighbors`.
        n: number of centres (``<= N``).
    Returns:
        ``(n,)`` int64 image indices.
    """
    N = neighbors.shape[0]
    n = min(n, N)
    order = torch.argsort(similarities[:, 1:].mean(1) if similarities.shape[1] > 1 else similarities[:, 0],
                          descending=True).tolist()
    members = neighbors.tolist()
    covered = [False] * N
    chosen, skipped = [], []
    for i in order:
        if len(chosen) == n:
            break
        if covered[i]:
            skipped.append(i)
            continue
        chosen.append(i)
        for j in members[i]:
            covered[j] = True
    chosen += skipped[: n - len(chosen)]
    return torch.tensor(chosen, dtype=torch.int64, device=neighbors.device)
