"""O(3) alignment of SFB coefficient vectors: grid search over SO(3), local refinement, mirror.

A method-of-moments reconstruction is determined only up to a rotation and the mirror
``J = diag(1, 1, -1)`` (:mod:`cryo_lightning.abinitio.moment_solver`). The transformation applied to an
estimate ``e`` is ``T(e) = rotate(J? e, R)``: first the optional mirror
(:meth:`~SphericalFourierBesselBasis.reflect`, axis ``z``), then ``V(x) -> V(R^T x)``. The
viewing distribution follows the volume: :func:`transform_viewing` applies the same ``T`` to its
coefficients (with poses ``A -> A R^T`` and ``A -> J A J``, the images are unchanged).

Search. ``<ref, rotate(e, R)> = sum_l <X_l, D_l(R)>_F`` with ``X_l = ref_l^T e_l`` (``(2l+1)^2``
per degree), so the score of many rotations costs only their Wigner matrices. A seeded uniform
set of rotations (default 5000, ~14 degrees apart, narrower than the correlation peak of degree
``l <= 8`` content, about ``180 / l`` degrees wide) is scored; the best few are refined by L-BFGS
on ``R = exp([w]x) R_0``. The relative error reported is ``||ref - T(e)|| / ||ref||``, which for
coefficients equals the relative L2 error of the band-limited maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cryo_lightning.physics.fourier import fourier_shell_correlation
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.rotations import random_rotations
from cryo_lightning.physics.spherical_harmonics import wigner_d

__all__ = [
    "VolumeAlignment",
    "relative_error",
    "transform_coefficients",
    "transform_viewing",
    "align_volumes",
    "aligned_fsc",
]

_CHUNK = 1024


@dataclass
class VolumeAlignment:
    """Result of :func:`align_volumes`.

    Attributes:
        rotation: ``(3, 3)`` float64 ``R`` of ``T``.
        reflected: whether ``T`` mirrors first.
        aligned: ``(count,)`` float64 ``T(estimate)``.
        relative_error: ``||reference - aligned|| / ||reference||``.
    """

    rotation: torch.Tensor
    reflected: bool
    aligned: torch.Tensor
    relative_error: float


def relative_error(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """``||reference - estimate|| / ||reference||`` (no alignment)."""
    return float((reference - estimate).norm() / reference.norm())


def transform_coefficients(
    basis: SphericalFourierBesselBasis, coeffs: torch.Tensor, rotation: torch.Tensor, reflected: bool = False
) -> torch.Tensor:
    """``T(coeffs)``: optional mirror ``z -> -z``, then ``V(x) -> V(R^T x)``. ``(..., count)``."""
    c = basis.reflect(coeffs, "z") if reflected else coeffs
    return basis.rotate(c, rotation.to(c))


def transform_viewing(
    coeffs: torch.Tensor, degree: int, rotation: torch.Tensor, reflected: bool = False
) -> torch.Tensor:
    """The same ``T`` on viewing-distribution coefficients (even degrees ``0..degree``).

    Args:
        coeffs: ``(b_count,)`` as in :class:`~cryo_lightning.physics.viewing_sh.SHViewingDistribution`.
        degree: its even degree.
        rotation: ``(3, 3)``.
        reflected: mirror first (``b_lm -> (-1)^(l + m) b_lm``, here ``(-1)^m`` as ``l`` is even).
    Returns:
        ``(b_count,)``: coefficients of ``rho(R^T J v)``.
    """
    d = wigner_d(degree, rotation.to(torch.float64))
    out, k = [], 0
    for l in range(0, degree + 1, 2):
        n = 2 * l + 1
        block = coeffs[k : k + n].to(torch.float64)
        if reflected:
            m = torch.arange(-l, l + 1, device=block.device)
            block = block * torch.where(torch.remainder(m, 2) == 1, -1.0, 1.0).to(block)
        out.append(d[l].to(block.device) @ block)
        k += n
    return torch.cat(out).to(coeffs.dtype)


def _exp_so3(w: torch.Tensor) -> torch.Tensor:
    """``exp([w]x)`` by the matrix exponential (smooth at ``w = 0``, unlike Rodrigues' formula)."""
    z = torch.zeros_like(w[0])
    k = torch.stack([torch.stack([z, -w[2], w[1]]), torch.stack([w[2], z, -w[0]]), torch.stack([-w[1], w[0], z])])
    return torch.linalg.matrix_exp(k)


def _score_tables(basis: SphericalFourierBesselBasis, ref: torch.Tensor, est: torch.Tensor) -> list[torch.Tensor]:
    return [r.T @ e for r, e in zip(basis.layout.blocks(ref), basis.layout.blocks(est))]


def _scores(tables: list[torch.Tensor], rotations: torch.Tensor) -> torch.Tensor:
    l_max = len(tables) - 1
    out = []
    for chunk in torch.split(rotations, _CHUNK):
        d = wigner_d(l_max, chunk)
        out.append(sum((dl * x).sum((-2, -1)) for dl, x in zip(d, tables)))
    return torch.cat(out)


def align_volumes(
    basis: SphericalFourierBesselBasis,
    reference: torch.Tensor,
    estimate: torch.Tensor,
    reflect: bool = True,
    n_grid: int = 5000,
    n_refine: int = 4,
    generator: torch.Generator | None = None,
) -> VolumeAlignment:
    """Best ``T`` in O(3) (or SO(3) with ``reflect=False``) mapping ``estimate`` onto ``reference``.

    Args:
        basis: the SFB basis of both coefficient vectors.
        reference, estimate: ``(count,)`` real.
        reflect: also try the mirrored estimate.
        n_grid: rotations in the grid search (seeded uniform draw).
        n_refine: best grid points refined per handedness.
        generator: RNG of the grid (default: seed 0, so results are reproducible).
    Returns:
        :class:`VolumeAlignment`.
    """
    ref = reference.detach().to(torch.float64)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    grid = random_rotations(n_grid, generator=gen, dtype=torch.float64).to(ref.device)
    grid = torch.cat([torch.eye(3, dtype=torch.float64, device=ref.device)[None], grid])
    best: VolumeAlignment | None = None
    for reflected in (False, True) if reflect else (False,):
        est = estimate.detach().to(torch.float64)
        est = basis.reflect(est, "z") if reflected else est
        tables = _score_tables(basis, ref, est)
        scores = _scores(tables, grid)
        for r0 in grid[torch.topk(scores, min(n_refine, grid.shape[0])).indices]:
            w = torch.zeros(3, dtype=torch.float64, device=ref.device, requires_grad=True)
            opt = torch.optim.LBFGS([w], max_iter=50, tolerance_grad=1e-12, tolerance_change=1e-14,
                                    line_search_fn="strong_wolfe")

            def closure() -> torch.Tensor:
                opt.zero_grad()
                rot = _exp_so3(w) @ r0
                d = wigner_d(len(tables) - 1, rot)
                loss = -sum((dl * x).sum() for dl, x in zip(d, tables))
                loss.backward()
                return loss

            opt.step(closure)
            rot = (_exp_so3(w) @ r0).detach()
            aligned = basis.rotate(est, rot)
            err = relative_error(ref, aligned)
            if best is None or err < best.relative_error:
                best = VolumeAlignment(rot, reflected, aligned, err)
    assert best is not None
    return best


def aligned_fsc(basis: SphericalFourierBesselBasis, reference: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
    """FSC between the voxel maps of two (already aligned) coefficient vectors.

    Returns:
        ``(L // 2 + 1,)`` curve of :func:`~cryo_lightning.physics.fourier.fourier_shell_correlation`
        (shell ``n`` at ``n / L`` cycles/pixel).
    """
    return fourier_shell_correlation(basis.evaluate(reference.to(torch.float64)),
                                     basis.evaluate(aligned.to(torch.float64)), 3)
