"""Simulated particle images of an SFB volume, streamed into image moments (training data, benchmarks).

Images follow the pixel pipeline of :mod:`~cryo_lightning.abinitio.moment_forward_model`
(``Re ifft2c(H V_hat(A^T (xi, 0)))``) and are linear in the rotated coefficients, so each CTF
group's identity-pose slices of the unit coefficient vectors are tabulated once
(``(count, L, L)`` float64 per group) and an image at pose ``A`` is
``einsum(rotate(a, A), units)``: exact, and about as cheap as a matrix product.
Poses come from a viewing distribution (:class:`~cryo_lightning.physics.viewing_sh.SHViewingDistribution`
or any sampler with ``sample(n, generator=..., dtype=...)``); image ``i`` belongs to CTF group
``i mod G``. Noise is white Gaussian, pixel variance ``signal_power / snr`` with the signal
power of :func:`~cryo_lightning.physics.noise.signal_power` (inside the disk of radius ``L / 2``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from cryo_lightning.abinitio.image_moments import ImageMoments, MomentEstimator, MomentLayout
from cryo_lightning.abinitio.moment_forward_model import slice_images
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.noise import signal_power

__all__ = ["MomentSimulator"]


class MomentSimulator:
    """Noisy, CTF-affected projections of SFB volumes and their moments.

    Args:
        basis: volume basis.
        layout: image basis of the moments.
        ctfs: ``(G, L, L)`` centred CTFs of the groups (``None``: one group, no CTF).
        chunk: images simulated at a time (memory ``chunk L^2`` float64 per array).
    """

    def __init__(self, basis: SphericalFourierBesselBasis, layout: MomentLayout, ctfs: torch.Tensor | None = None,
                 chunk: int = 10_000) -> None:
        self.basis, self.layout, self.chunk = basis, layout, int(chunk)
        ctfs = torch.ones(1, basis.L, basis.L, dtype=torch.float64) if ctfs is None else ctfs.to(torch.float64)
        self.n_groups = ctfs.shape[0]
        eye = torch.eye(basis.layout.count, dtype=torch.float64, device=basis.device)
        identity = torch.eye(3, dtype=torch.float64, device=basis.device)[None]
        self._units = [slice_images(basis, eye, identity, ctf.to(basis.device))[:, 0] for ctf in ctfs]

    def images(self, coeffs: torch.Tensor, distribution, n: int, generator: torch.Generator,
               noise_std: float | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """Yield ``(clean, noisy, groups)`` chunks of ``n`` images in all.

        Args:
            coeffs: ``(count,)`` SFB coefficients.
            distribution: pose sampler (``sample(m, generator=..., dtype=...) -> (m, 3, 3)``).
            n: number of images.
            generator: CPU RNG for poses and noise (poses first, then noise, per chunk).
            noise_std: pixel noise standard deviation (``None``: ``noisy`` is ``None``).
        Returns:
            iterator of ``clean (m, L, L)`` float64, ``noisy (m, L, L)`` or ``None``, ``groups (m,)`` int64.
        """
        a = coeffs.to(self.basis.device, torch.float64)
        for start in range(0, n, self.chunk):
            m = min(self.chunk, n - start)
            rotated = self.basis.rotate(a, distribution.sample(m, generator=generator, dtype=torch.float64).to(a.device))
            groups = torch.arange(start, start + m, device=a.device) % self.n_groups
            clean = torch.empty(m, self.basis.L, self.basis.L, dtype=torch.float64, device=a.device)
            for g, units in enumerate(self._units):
                sel = groups == g
                clean[sel] = torch.einsum("nc,cyx->nyx", rotated[sel], units)
            noisy = None
            if noise_std is not None:
                noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64).to(a.device)
                noisy = clean + noise * noise_std
            yield clean, noisy, groups

    def noise_std(self, coeffs: torch.Tensor, distribution, snr: float, generator: torch.Generator,
                  pilot: int = 2000) -> float:
        """Pixel noise standard deviation for ``snr``, from the signal power of ``pilot`` clean images."""
        clean = next(self.images(coeffs, distribution, pilot, generator))[0]
        return math.sqrt(float(signal_power(clean, dim=(-3,))) / snr)

    def moments(self, coeffs: torch.Tensor, distribution, sizes: int | list[int], generator: torch.Generator,
                noise_std: float | None = None, third: bool = False) -> dict[int, ImageMoments]:
        """Debiased moments of the first ``N`` images for every ``N`` in ``sizes`` (one stream).

        Args:
            coeffs, distribution, generator, noise_std: as in :meth:`images`.
            sizes: image counts (each a multiple of ``chunk`` or the largest one).
            third: also estimate the third-moment slice.
        Returns:
            ``{N: ImageMoments}`` (noise-debiased with the known ``noise_std^2``; clean moments when
            ``noise_std`` is ``None``).
        """
        sizes = sorted({int(sizes)} if isinstance(sizes, int) else {int(s) for s in sizes})
        est = MomentEstimator(self.layout, self.n_groups, third=third)
        sigma2 = None if noise_std is None else noise_std**2
        out, done = {}, 0
        for clean, noisy, groups in self.images(coeffs, distribution, sizes[-1], generator, noise_std):
            est.update(clean if noisy is None else noisy, groups, sigma2)
            done += clean.shape[0]
            if done in sizes:
                out[done] = est.result()
        missing = [s for s in sizes if s not in out]
        if missing:
            raise ValueError(f"sizes {missing} are not multiples of chunk={self.chunk} (nor the largest size)")
        return out
