"""Covariance Wiener filter (CWF, "Cov2D") of Bhamre, Zhang & Singer (2016).

Model, per image ``i`` of a set, in the steerable Fourier-Bessel basis of
:mod:`cryo_lightning.physics.steerable_basis` (complex coefficients, one block per angular
frequency ``k``)::

    y_i = H_i x_i + n_i,    E[x_i] = mu (k = 0 only),    Cov[x_i] = C = diag_k(C_k),    Cov[n_i] = sigma^2 I.

``x_i`` are the coefficients of the projection (no CTF), ``H_i`` the block-diagonal operator of the
image's CTF and ``sigma^2`` the (known) per-pixel noise variance. Projections of a molecule over
uniformly distributed viewing directions *and in-plane rotations* have a rotationally invariant
distribution, hence the mean only in ``k = 0`` and the block-diagonal covariance (Hermitian blocks
for ``k >= 1``). By default the statistics are also made invariant to mirroring the images, as
ASPIRE does (``do_refl``): the blocks become real symmetric. A chiral molecule's projections are
not mirror invariant, but the imaginary parts are small and estimating them costs more than it
gains (measured at L = 64: relative MSE lower in every setting tried, by about 1% at N = 5000 and
5-20% at N = 16-128). Per set and per block:

1. Mean and covariance, by least squares through the CTFs with eigenvalue shrinkage
   (:mod:`cryo_lightning.denoise.block_moments`; its normal equations are solved by conjugate
   gradients, :mod:`cryo_lightning.denoise.normal_equations`, over CTF groups,
   :mod:`cryo_lightning.denoise.ctf_groups`), optionally blended with a population prior
   (:mod:`cryo_lightning.denoise.population_prior`).
2. Wiener filter per image: ``x_hat_i = mu + C H_i^T (H_i C H_i^T + sigma^2 I)^-1 (y_i - H_i mu)``
   (computed in the range of ``C``, whose rank is small after shrinkage).

The denoised image is the CTF applied to the estimated projection: ``ifft2c(ctf * fft2c(p_hat))``
with the image's full 2D CTF, where ``p_hat`` is evaluated from ``x_hat`` on the pixel grid and is
0 outside the inscribed disk (the CTF spreads it slightly beyond). The CTF enters the statistics
through its angular average (the exact block-diagonal part of the CTF operator; astigmatism's
coupling of ``k`` and ``k +- 2`` is neglected). Relative MSE is computed over the whole image,
so the signal outside the disk that the basis cannot represent counts as error.
"""

from __future__ import annotations

import torch

from cryo_lightning.denoise.block_algebra import hermitian_part, real_matmul
from cryo_lightning.denoise.block_moments import estimate_block_moments
from cryo_lightning.denoise.ctf_groups import ctf_groups
from cryo_lightning.denoise.population_prior import PopulationPrior, blend_with_prior
from cryo_lightning.physics.fourier import fft2c, ifft2c
from cryo_lightning.physics.steerable_basis import FourierBesselBasis, fourier_bessel_basis

__all__ = ["wiener_block", "cwf_coefficients", "cwf_denoise"]


def wiener_block(
    y: torch.Tensor,
    covariance: torch.Tensor,
    noise_variance: torch.Tensor,
    H: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Wiener (linear MMSE) estimate of the projections' coefficients in one block.

    ``x_hat = mu + C H^T (H C H^T + sigma^2 I)^-1 (y - H mu)``, evaluated as
    ``mu + V (V^H A V + sigma^2 I)^-1 V^H H^T (y - H mu)`` with ``C = V V^H`` restricted to its
    range (at most the largest rank in the batch).

    Args:
        y: ``(B, N, Q)`` complex.
        covariance: ``(B, Q, Q)`` complex Hermitian PSD.
        noise_variance: ``(B,)``.
        H: ``(B, N, Q, Q)`` real, or None (no CTF).
        mean: ``(B, Q)`` complex, or None (0).
    Returns:
        ``(B, N, Q)`` complex128.
    """
    B, N, Q = y.shape
    y = y.to(torch.complex128)
    s2 = noise_variance.to(torch.float64).reshape(B)
    H = H.to(torch.float64) if H is not None else None
    if mean is not None:
        y = y - (mean[:, None] if H is None else real_matmul(H, mean[:, None, :, None].expand(B, N, Q, 1)).squeeze(-1))
    evals, evecs = torch.linalg.eigh(hermitian_part(covariance.to(torch.complex128)))
    rank = int((evals > 1e-12 * evals[:, -1:].clamp_min(1e-300)).sum(-1).max()) if Q else 0
    if rank == 0:
        x = torch.zeros_like(y)
    elif H is None:
        gain = (evals / (evals + s2[:, None])).to(torch.complex128)
        x = ((y @ evecs.conj()) * gain[:, None, :]) @ evecs.transpose(1, 2)
    else:
        V = evecs[..., -rank:] * evals[:, None, -rank:].clamp_min(0).sqrt().to(torch.complex128)  # (B, Q, r)
        HV = real_matmul(H, V[:, None].expand(B, N, Q, rank))  # (B, N, Q, r)
        eye = torch.eye(rank, dtype=torch.complex128, device=y.device)
        K = HV.transpose(-1, -2).conj() @ HV + s2[:, None, None, None] * eye
        rhs = HV.transpose(-1, -2).conj() @ y[..., None]
        x = (V[:, None] @ torch.linalg.solve(K, rhs)).squeeze(-1)
    return x if mean is None else x + mean[:, None]


def cwf_coefficients(
    coeffs: torch.Tensor,
    basis: FourierBesselBasis,
    noise_variance: torch.Tensor,
    ctf_profiles: torch.Tensor | None = None,
    *,
    shrinkage: bool = True,
    reflection_invariant: bool = True,
    max_ctf_groups: int = 64,
    prior: PopulationPrior | None = None,
    prior_strength: float = 0.0,
    prior_tempering: float = 0.0,
) -> torch.Tensor:
    """CWF estimate of the projections' basis coefficients, statistics estimated per set.

    Args:
        coeffs: ``(B, N, count)`` complex coefficients of the noisy images.
        basis: the basis of ``coeffs``.
        noise_variance: ``(B,)`` per-pixel noise variance.
        ctf_profiles: ``(B, N, n_bins)`` from :meth:`FourierBesselBasis.radial_profile`, or None.
        shrinkage, reflection_invariant, max_ctf_groups: see
            :func:`~cryo_lightning.denoise.block_moments.estimate_block_moments` and
            :func:`~cryo_lightning.denoise.ctf_groups.ctf_groups`.
        prior, prior_strength, prior_tempering: a population prior, its strength ``nu`` in images
            and the tempering ``beta`` of its molecule weights
            (:mod:`cryo_lightning.denoise.population_prior`); None or ``nu = 0``: the set's own
            statistics only.
    Returns:
        ``(B, N, count)`` complex128 coefficients of the estimated projections (no CTF).
    """
    groups = None if ctf_profiles is None else ctf_groups(ctf_profiles, max_ctf_groups)
    blocks = basis.split(coeffs)
    operators = [None if ctf_profiles is None else basis.radial_operator(ctf_profiles, k) for k in range(len(blocks))]
    moments = [
        estimate_block_moments(y, noise_variance, H, with_mean=k == 0, shrinkage=shrinkage,
                               reflection_invariant=reflection_invariant, groups=groups)
        for k, (y, H) in enumerate(zip(blocks, operators))
    ]
    if prior is not None and prior_strength > 0:
        moments = blend_with_prior(moments, blocks, operators, noise_variance, prior, prior_strength,
                                    prior_tempering)
    return torch.cat([wiener_block(y, C, noise_variance, H, mean)
                      for y, H, (mean, C) in zip(blocks, operators, moments)], dim=-1)

@torch.no_grad()
def cwf_denoise(
    noisy: torch.Tensor,
    ctf: torch.Tensor | None,
    noise_variance: torch.Tensor | float,
    *,
    shrinkage: bool = True,
    reflection_invariant: bool = True,
    max_ctf_groups: int = 64,
    basis: FourierBesselBasis | None = None,
    prior: PopulationPrior | None = None,
    prior_strength: float = 0.0,
    prior_tempering: float = 0.0,
) -> torch.Tensor:
    """Covariance Wiener filter of every image, with mean and covariance estimated from its set.

    Args:
        noisy: ``(B, N, L, L)`` real images of ``B`` sets (centred particles).
        ctf: ``(B, N, L, L)`` centred-layout CTF of each image (RELION sign), or None / all ones
            for no CTF.
        noise_variance: ``(B,)`` (or a scalar) per-pixel noise variance, in image units squared.
        shrinkage: shrink the covariance's eigenvalues (ASPIRE's default); False subtracts the
            noise term and clips.
        reflection_invariant: impose the mirror symmetry of the statistics (ASPIRE's default;
            fewer parameters, lower error for small sets) instead of a Hermitian covariance.
        max_ctf_groups: CTF groups for the covariance's least-squares operator (exact for
            ``N <= max_ctf_groups``).
        basis: a :class:`FourierBesselBasis` for ``L`` (default: the cached one for the input's
            device).
        prior, prior_strength, prior_tempering: see :func:`cwf_coefficients`.
    Returns:
        ``(B, N, L, L)`` estimates of the clean CTF-affected images, dtype and device of ``noisy``.
    """
    B, N, L, _ = noisy.shape
    if basis is None:
        basis = fourier_bessel_basis(L, noisy.device, torch.float64 if noisy.dtype == torch.float64 else torch.float32)
    s2 = torch.as_tensor(noise_variance, dtype=torch.float64, device=noisy.device).expand(B)
    with_ctf = ctf is not None and not bool((ctf == 1).all())
    profiles = basis.radial_profile(ctf) if with_ctf else None
    x = cwf_coefficients(
        basis.expand(noisy), basis, s2, profiles, shrinkage=shrinkage,
        reflection_invariant=reflection_invariant, max_ctf_groups=max_ctf_groups,
        prior=prior, prior_strength=prior_strength, prior_tempering=prior_tempering,
    )
    images = basis.evaluate(x.to(torch.complex64 if basis.dtype == torch.float32 else torch.complex128))
    if with_ctf:
        images = ifft2c(fft2c(images) * ctf.to(images.dtype)).real
    return images.to(noisy.dtype)
