"""CTF-aware average of aligned images, the Wiener estimate of the CTF-free reference image.

After ASPIRE-Python's ``BFSRAverager2D`` (Bhamre, Zhang & Singer 2016). The images are rotated
and shifted in Fourier space (the 2x zero-padded spectrum is sampled bilinearly on the rotated
grid, the shift is a phase ramp) and averaged with their CTFs, rotated the same way
(:func:`aligned_average`)::

    A(k) = sum_j H_j(k) F_j(k) / (sum_j H_j(k)^2 + eps(k)),

``F_j``, ``H_j`` the aligned spectrum and CTF of member ``j`` (the CTF is real, RELION sign).
This is the posterior mean under a Gaussian prior when ``eps(k) = L^2 sigma^2 / S(|k|)`` with
``S`` the radial power spectrum of the CTF-free projections (:func:`wiener_regularization`
estimates it from the set with :func:`~cryo_lightning.denoise.wiener.estimate_radial_spectrum`).
``eps = 0`` and no CTF give the plain mean of the aligned images. (Chosen over phase-flipped
averaging: it also restores the CTF's amplitudes, so the average compares with a CTF-free
projection.) The rotated CTF is interpolated bilinearly on the ``L`` grid: accurate where the CTF
varies slowly across a pixel, least so near Nyquist at high defocus, where the signal is weakest.

Angles and shifts follow the conventions of :mod:`cryo_lightning.abinitio.image_alignment`:
image ``j`` contributes ``shift(rotate(image_j, angle_j), shift_j)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cryo_lightning.abinitio.invariant_features import _noise_variance
from cryo_lightning.denoise.wiener import estimate_radial_spectrum
from cryo_lightning.physics.fourier import frequency_grid, ifft2c, radial_grid
from cryo_lightning.physics.projection import translate_spectrum

__all__ = ["wiener_regularization", "aligned_average"]

# Images used to estimate the radial signal spectrum for the Wiener term (plenty for ~L/2 shells).
_MAX_SPECTRUM_IMAGES = 4096


def wiener_regularization(
    images: torch.Tensor, ctf: torch.Tensor | None = None, noise_variance: float | torch.Tensor | None = None
) -> torch.Tensor:
    """The Wiener term ``eps(k) = L^2 sigma^2 / S(|k|)`` of :func:`aligned_average`.

    ``S`` is the radial power spectrum of the CTF-free projections, fitted on (at most 4096
    evenly spaced) images by :func:`~cryo_lightning.denoise.wiener.estimate_radial_spectrum`;
    where it is 0 (pure noise), ``eps`` is infinite and the average there is 0.

    Args:
        images: ``(N, L, L)`` noisy images.
        ctf: ``(N, L, L)`` centred CTFs or None.
        noise_variance: per-pixel noise variance, or None to estimate it from the background.
    Returns:
        ``(L, L)`` centred, in units of ``|DFT|^2`` (``sum_j H_j^2`` is dimensionless).
    """
    N, L = images.shape[0], images.shape[-1]
    s2 = _noise_variance(images, noise_variance)
    pick = torch.linspace(0, N - 1, min(N, _MAX_SPECTRUM_IMAGES), device=images.device).round().long()
    x = images[pick]
    h = ctf[pick] if ctf is not None else torch.ones_like(x)
    spectrum = estimate_radial_spectrum(x[None], h[None], s2)[0]
    shells = torch.round(radial_grid(L, 2, device=images.device)).long()
    S = spectrum[shells]
    return (L * L * s2) / S.clamp_min(torch.finfo(S.dtype).tiny)


def _padded_spectrum(images: torch.Tensor) -> torch.Tensor:
    """``fft2c`` of the images zero-padded to ``2L`` (centre ``L // 2`` -> ``L``): ``(M, 2L, 2L)``.

    Written without ``fftshift`` (whose rolls cost more than the FFT): the image is placed
    directly in the wrapped layout of ``ifftshift``, and the output shift by ``L`` becomes the
    input modulation ``(-1)^(i + j)``.
    """
    M, L = images.shape[0], images.shape[-1]
    c = L // 2
    # Pixel i lands at index i - c (mod 2L), of the same parity as i - c: modulate before placing.
    n = torch.arange(L, device=images.device) - c
    x = images * (1 - 2 * ((n[:, None] + n[None, :]) % 2)).to(images.dtype)
    y = images.new_zeros(M, 2 * L, 2 * L)
    y[:, : L - c, : L - c] = x[:, c:, c:]
    if c > 0:
        y[:, : L - c, -c:] = x[:, c:, :c]
        y[:, -c:, : L - c] = x[:, :c, c:]
        y[:, -c:, -c:] = x[:, :c, :c]
    return torch.fft.fft2(y)


def _aligned_spectra(
    images: torch.Tensor, angles: torch.Tensor, ctf: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Centred spectra ``F(R_{-a} k)`` of ``(M, L, L)`` images rotated by ``angles (M,)``, and their
    CTFs ``H(R_{-a} k)`` (bilinear on the ``L`` grid) when given."""
    L = images.shape[-1]
    spec = torch.view_as_real(_padded_spectrum(images)).permute(0, 3, 1, 2)  # (M, 2, 2L, 2L)
    ky, kx = frequency_grid(L, 2, device=images.device, dtype=images.dtype)
    c, s = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
    q = torch.stack([kx * c + ky * s, -kx * s + ky * c], dim=-1)  # R_{-a} k as (x, y), (M, L, L, 2)
    Lp = 2 * L
    grid = (q * Lp + Lp // 2) * 2 / (Lp - 1) - 1
    out = F.grid_sample(spec, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    rotated = torch.complex(out[:, 0], out[:, 1])
    if ctf is None:
        return rotated, None
    grid_l = (q * L + L // 2) * 2 / (L - 1) - 1
    h = F.grid_sample(ctf[:, None].to(images.dtype), grid_l, mode="bilinear", padding_mode="border",
                      align_corners=True)
    return rotated, h[:, 0]


def aligned_average(
    images: torch.Tensor,
    angles: torch.Tensor,
    shifts: torch.Tensor,
    ctf: torch.Tensor | None = None,
    eps: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """CTF-aware average of aligned images: ``sum_j H_j F_j / (sum_j H_j^2 + eps)`` in Fourier space.

    Args:
        images: ``(..., k, L, L)`` real images of each class.
        angles: ``(..., k)`` radians, shifts ``(..., k, 2)`` pixels ``(x, y)``, from
            :func:`~cryo_lightning.abinitio.image_alignment.align`: image ``j`` contributes
            ``shift(rotate(image_j, angle_j), shift_j)``.
        ctf: ``(..., k, L, L)`` centred CTFs (RELION sign) or None (all ones).
        eps: scalar or ``(L, L)`` centred Wiener term (:func:`wiener_regularization`); 0 with no
            CTF gives the plain mean.
    Returns:
        ``(..., L, L)`` estimates of the CTF-free image in the reference's frame.
    """
    L, k = images.shape[-1], images.shape[-3]
    lead = images.shape[:-3]
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.reshape(-1, L, L).to(dtype)
    h_in = None if ctf is None else ctf.reshape(-1, L, L)
    spec, h = _aligned_spectra(x, angles.reshape(-1).to(dtype), h_in)
    if bool(shifts.any()):
        spec = translate_spectrum(spec, shifts.reshape(-1, 2).to(dtype))
    if h is None:
        h = torch.ones_like(spec.real)
    num = (h * spec).reshape(-1, k, L, L).sum(1)
    den = h.square().reshape(-1, k, L, L).sum(1) + torch.as_tensor(eps, dtype=dtype, device=x.device)
    avg = ifft2c(num / den.clamp_min(torch.finfo(dtype).tiny)).real
    return avg.reshape(*lead, L, L).to(images.dtype)
