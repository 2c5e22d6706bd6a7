"""Context sets: how the particles of a dataset are grouped into the sets a set denoiser sees."""

from __future__ import annotations

import numpy as np
import torch

from cryo_lightning.io.errors import InputError

__all__ = ["context_sets"]


def context_sets(n: int, set_size: int, mode: str, seed: int = 0,
                 embedding: torch.Tensor | None = None) -> list[np.ndarray]:
    """Partition particle rows ``0..n-1`` into sets of ``set_size`` (the last may be smaller).

    ``mode="random"``: a seeded permutation, chunked. ``mode="neighbours"``: greedy, each set is an
    unassigned particle and its ``set_size - 1`` nearest unassigned neighbours in ``embedding``.
    """
    if mode == "random":
        order = np.random.default_rng(seed).permutation(n)
        return [order[i : i + set_size] for i in range(0, n, set_size)]
    if mode != "neighbours" or embedding is None:
        raise InputError(f"--context must be 'random' or 'neighbours', got {mode!r}")
    free = torch.ones(n, dtype=torch.bool, device=embedding.device)
    sets = []
    for start in np.random.default_rng(seed).permutation(n).tolist():
        if not free[start]:
            continue
        sim = embedding @ embedding[start]
        sim[~free] = -torch.inf
        members = torch.topk(sim, min(set_size, int(free.sum()))).indices
        free[members] = False
        sets.append(members.cpu().numpy())
    return sets
