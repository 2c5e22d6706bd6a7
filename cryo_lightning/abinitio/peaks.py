"""Sub-sample location of a peak sampled on a grid."""

from __future__ import annotations

import torch

__all__ = ["parabolic_offset"]


def parabolic_offset(left: torch.Tensor, centre: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Offset in ``[-0.5, 0.5]`` samples of the vertex of the parabola through three samples
    around a maximum (0 where the samples are not concave, i.e. no peak to refine)."""
    curvature = left - 2 * centre + right
    offset = 0.5 * (left - right) / torch.where(curvature < 0, curvature, -torch.ones_like(curvature))
    return torch.where(curvature < 0, offset, torch.zeros_like(offset)).clamp(-0.5, 0.5)
