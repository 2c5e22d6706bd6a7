"""Two operations on the angular blocks of steerable-basis coefficients, shared by the covariance
Wiener filter's moment estimates (:mod:`cryo_lightning.denoise.block_moments`) and its Wiener step
(:mod:`cryo_lightning.denoise.cwf`): a block's CTF operator is real, its coefficients complex.
"""

from __future__ import annotations

import torch

__all__ = ["hermitian_part", "real_matmul"]


def hermitian_part(x: torch.Tensor) -> torch.Tensor:
    """``(X + X^H) / 2`` of a batch of square matrices."""
    return 0.5 * (x + x.transpose(-1, -2).conj())


def real_matmul(H: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``H @ z`` for real ``H (..., Q, Q)`` and complex ``z (..., Q, m)``, in real arithmetic."""
    zr = torch.view_as_real(z.contiguous())  # (..., Q, m, 2)
    out = H @ zr.flatten(-2)
    return torch.view_as_complex(out.unflatten(-1, (z.shape[-1], 2)).contiguous())
