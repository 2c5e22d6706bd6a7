"""Ab initio map from particle images by the method of moments (``cryol reconstruct --method moments``).

The images' CTF-grouped, noise-debiased moments
(:func:`~cryo_lightning.abinitio.image_moments.estimate_moments`) are fitted by the classical
solver (:func:`~cryo_lightning.abinitio.moment_solver.fit_moments`) with the forward model of
:class:`~cryo_lightning.abinitio.moment_forward_model.MomentModel`, and the fitted SFB
coefficients are evaluated on the voxel grid.
"""

from __future__ import annotations

import torch

from cryo_lightning.abinitio.image_moments import ImageMoments, MomentLayout, estimate_moments
from cryo_lightning.abinitio.moment_forward_model import MomentModel
from cryo_lightning.abinitio.moment_solver import MomResult, fit_moments
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.viewing_sh import SHViewingDistribution

__all__ = ["moment_problem", "moments_reconstruct"]


def moment_problem(images: torch.Tensor, noise_variance: float | torch.Tensor, ctfs: torch.Tensor | None,
                   groups: torch.Tensor | None, l_max: int, bandlimit: float, view_degree: int, third: bool,
                   device: torch.device | str | None = None
                   ) -> tuple[SphericalFourierBesselBasis, MomentModel, ImageMoments]:
    """Basis, forward model and debiased moments of particle images (arguments as in :func:`moments_reconstruct`)."""
    L = images.shape[-1]
    layout = MomentLayout(L, l_max, bandlimit=bandlimit, device=device)
    basis = SphericalFourierBesselBasis(L, l_max=l_max, bandlimit=bandlimit, device=device)
    n_groups = 1 if ctfs is None else ctfs.shape[0]
    if n_groups > 1 and groups is None:
        raise ValueError("groups are required with more than one CTF")
    target = estimate_moments(images, layout, groups=groups, noise_variance=noise_variance, n_groups=n_groups,
                              third=third)
    return basis, MomentModel(basis, layout, view_degree, ctfs=ctfs, third=third), target


def moments_reconstruct(
    images: torch.Tensor,
    noise_variance: float | torch.Tensor,
    ctfs: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    l_max: int = 6,
    bandlimit: float = 0.25,
    view_degree: int = 4,
    n_starts: int = 4,
    iterations: tuple[int, ...] = (50, 200, 300),
    whiten: bool = True,
    hops: int = 0,
    newton: int = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, SHViewingDistribution, torch.Tensor, MomResult]:
    """Ab initio map from particle images by the method of moments (for ``cryol reconstruct``).

    Args:
        images: ``(N, L, L)`` particles, centred, in-plane rotations assumed uniform.
        noise_variance: ``sigma^2`` (scalar or ``(N,)``), e.g. from
            :func:`~cryo_lightning.physics.noise.estimate_noise_variance`.
        ctfs: ``(G, L, L)`` centred CTFs of the groups (``None``: no CTF).
        groups: ``(N,)`` group of each image (required with ``ctfs`` when ``G > 1``).
        l_max: SFB degree of the volume.
        bandlimit: volume and image band limit, cycles/pixel.
        view_degree: ``2h`` of the viewing distribution.
        n_starts, iterations, whiten, hops, newton, generator: as in
            :func:`~cryo_lightning.abinitio.moment_solver.fit_moments` (a third
            ``iterations`` entry adds the third-moment stage).
        device: where to compute.
    Returns:
        ``(coeffs (count,), distribution, volume (L, L, L) float32, result)``; the map's
        orientation and hand are arbitrary.
    """
    third = len(iterations) > 2 and iterations[2] > 0
    basis, model, target = moment_problem(images, noise_variance, ctfs, groups, l_max, bandlimit, view_degree, third,
                                          device)
    result = fit_moments(model, target, n_starts=n_starts, iterations=iterations, whiten=whiten, hops=hops,
                         newton=newton, generator=generator, progress=hops > 0)
    volume = basis.evaluate(result.coeffs).to(torch.float32)
    return result.coeffs, result.distribution, volume, result
