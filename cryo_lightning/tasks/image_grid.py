"""Image grids for TensorBoard and gallery PNGs (noisy | denoised | clean rows)."""

from __future__ import annotations

import torch

__all__ = ["image_grid"]


def image_grid(rows: list[torch.Tensor], count: int) -> torch.Tensor:
    """``(R L, k L)`` grid: row ``r`` shows the first ``k = min(count, images)`` images of ``rows[r]``.

    Args:
        rows: tensors ``(..., L, L)`` (flattened to a list of images each).
        count: images per row.
    Returns:
        float tensor in ``[0, 1]``, each image contrast-stretched on its own (display only).
    """
    flat = [x.detach().reshape(-1, *x.shape[-2:])[:count].float().cpu() for x in rows]

    def scaled(x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.amin((-1, -2), keepdim=True), x.amax((-1, -2), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-12)

    return torch.cat([torch.cat(list(scaled(r)), dim=-1) for r in flat], dim=-2)
