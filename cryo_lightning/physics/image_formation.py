"""The noise-free image formation model shared by simulation and training.

``Y_hat(k) = CTF(k) * P_hat(k) * exp(+2 pi i k . o)``: a Fourier-slice projection, the CTF
(RELION sign, positive at s = 0), then the RELION origin ``o`` (pixels), which places the particle
centre at ``box centre - o``.
"""

from __future__ import annotations

import torch

from cryo_lightning.physics.fourier import ifft2c
from cryo_lightning.physics.projection import VolumeSpectrum, project_spectrum, translate_spectrum

__all__ = ["clean_images"]


def clean_images(
    spectrum: VolumeSpectrum,
    rotations: torch.Tensor,
    ctf: torch.Tensor | None = None,
    origins: torch.Tensor | None = None,
) -> torch.Tensor:
    """Noise-free particle images in RELION's conventions.

    Args:
        spectrum: from :func:`~cryo_lightning.physics.projection.volume_spectrum`, batch ``B``.
        rotations: ``(B, N, 3, 3)`` (or ``(N, 3, 3)`` for ``B == 1``) RELION matrices.
        ctf: ``(B, N, L, L)`` centred CTF (:func:`~cryo_lightning.physics.ctf.ctf_2d`), or None.
        origins: ``(B, N, 2)`` RELION origins ``(rlnOriginX, rlnOriginY)`` in pixels, or None.
    Returns:
        ``(B, N, L, L)`` (or ``(N, L, L)``) real images.
    """
    spectra = project_spectrum(spectrum, rotations)
    if ctf is not None:
        spectra = spectra * ctf
    if origins is not None:
        spectra = translate_spectrum(spectra, -origins.to(spectra.real.dtype))
    return ifft2c(spectra).real
