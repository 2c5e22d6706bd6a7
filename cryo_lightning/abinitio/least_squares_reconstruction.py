"""Least-squares 3D reconstruction from images with known poses and CTFs (conjugate gradients).

Solves ``min_x ||A x - y||^2 + lam ||x||^2`` where ``A`` is the RELION image formation model of
:func:`~cryo_lightning.physics.image_formation.clean_images` (Fourier-slice projection, CTF,
origin shift), by conjugate gradients on the normal equations ``(A^T A + lam I) x = A^T y``.
``A^T`` is the exact adjoint (vector-Jacobian product of ``A``), applied in chunks of images so
memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cryo_lightning.physics.fourier import fourier_shell_correlation
from cryo_lightning.physics.image_formation import clean_images
from cryo_lightning.physics.projection import volume_spectrum

__all__ = ["ReconstructionResult", "forward_operator", "reconstruct", "reconstruct_half_sets"]


@dataclass
class ReconstructionResult:
    """A reconstruction and how the solver got there.

    Attributes:
        volume: ``(L, L, L)``, ``(z, y, x)``, in the units that make ``A volume ~ images``.
        residuals: relative residual ``||r_k|| / ||A^T y||`` after each iteration.
    """

    volume: torch.Tensor
    residuals: list[float] = field(default_factory=list)


def forward_operator(
    volume: torch.Tensor, rotations: torch.Tensor, ctf: torch.Tensor | None = None,
    origins: torch.Tensor | None = None, oversampling: int = 2, interpolation: str = "linear",
) -> torch.Tensor:
    """``A x``: images ``(n, L, L)`` of a volume ``(L, L, L)`` at poses ``(n, 3, 3)``, with optional
    CTFs ``(n, L, L)`` and RELION origins ``(n, 2)`` pixels."""
    spectrum = volume_spectrum(volume, oversampling, interpolation)
    out = clean_images(spectrum, rotations[None], None if ctf is None else ctf[None],
                       None if origins is None else origins[None])
    return out[0]


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def reconstruct(
    images: torch.Tensor, rotations: torch.Tensor, ctf: torch.Tensor | None = None,
    origins: torch.Tensor | None = None, lam: float = 1e-3, iterations: int = 30, tol: float = 1e-5,
    chunk: int = 256, oversampling: int = 2, interpolation: str = "linear",
) -> ReconstructionResult:
    """Conjugate-gradient least-squares reconstruction.

    Args:
        images: ``(n, L, L)`` particle images.
        rotations: ``(n, 3, 3)`` RELION matrices.
        ctf: ``(n, L, L)`` centred CTFs (RELION sign) or None.
        origins: ``(n, 2)`` RELION origins in pixels or None.
        lam: Tikhonov weight, relative to the mean diagonal of ``A^T A`` (estimated as ``n / L``
            per voxel for unit CTF: a projection sums ``L`` voxels).
        iterations: maximum CG iterations.
        tol: stop when the relative residual falls below it.
        chunk: images per forward/adjoint pass (memory).
    Returns:
        :class:`ReconstructionResult`.
    """
    n, L = images.shape[0], images.shape[-1]
    dtype = images.dtype
    pieces = _chunks(n, chunk)

    def apply(x: torch.Tensor, rows: slice) -> torch.Tensor:
        return forward_operator(x, rotations[rows], None if ctf is None else ctf[rows],
                                None if origins is None else origins[rows], oversampling, interpolation)

    def adjoint(y: torch.Tensor, rows: slice) -> torch.Tensor:
        _, vjp = torch.func.vjp(lambda v: apply(v, rows), torch.zeros(L, L, L, dtype=dtype, device=images.device))
        return vjp(y)[0]

    def normal(x: torch.Tensor) -> torch.Tensor:
        return sum(adjoint(apply(x, rows), rows) for rows in pieces) + lam * (n / L) * x

    b = sum(adjoint(images[rows], rows) for rows in pieces)
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum()
    b_norm = b.norm().clamp_min(torch.finfo(dtype).tiny)
    result = ReconstructionResult(x)
    for _ in range(iterations):
        Ap = normal(p)
        alpha = rs / (p * Ap).sum()
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = (r * r).sum()
        result.residuals.append(float(rs_new.sqrt() / b_norm))
        if result.residuals[-1] < tol:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    result.volume = x
    return result


def reconstruct_half_sets(
    images: torch.Tensor, rotations: torch.Tensor, subsets: torch.Tensor, ctf: torch.Tensor | None = None,
    origins: torch.Tensor | None = None, **kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reconstruct the two half sets (``subsets`` 1 and 2, RELION's rlnRandomSubset) separately.

    Returns:
        ``(half1, half2, fsc)`` with ``fsc`` ``(L // 2 + 1,)`` per one-voxel shell.
    """
    halves = []
    for k in (1, 2):
        sel = subsets == k
        halves.append(reconstruct(images[sel], rotations[sel], None if ctf is None else ctf[sel],
                                  None if origins is None else origins[sel], **kwargs).volume)
    return halves[0], halves[1], fourier_shell_correlation(halves[0], halves[1], 3)
