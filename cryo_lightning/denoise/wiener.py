"""Radial, CTF-aware Wiener filter, with the signal spectrum estimated from each set.

Model, per image ``i`` of a set and per frequency ``k`` (centred unnormalised DFT, so white
noise of per-pixel variance ``sigma^2`` has ``E|N(k)|^2 = L^2 sigma^2``)::

    Y_i(k) = C_i(k) X_i(k) + N_i(k),    E|X_i(k)|^2 = S(|k|),

with ``X_i`` the projection's spectrum, ``C_i`` the image's CTF and ``S`` radial and shared by the
set. ``S`` is fitted per one-pixel shell by least squares on ``|Y_i(k)|^2 - L^2 sigma^2 =
C_i(k)^2 S`` over all images and frequencies of the shell, and clamped at 0. Each image is then
filtered towards the target ``C_i X_i`` (the clean CTF-affected image) with the MMSE linear
estimate under a Gaussian prior: ``C^2 S / (C^2 S + L^2 sigma^2) * Y``.
"""

from __future__ import annotations

import torch

from cryo_lightning.physics.fourier import fft2c, ifft2c, radial_grid

__all__ = ["estimate_radial_spectrum", "wiener_filter", "wiener_denoise"]


def _shells(L: int, device: torch.device) -> torch.Tensor:
    """Shell index ``round(r)`` of every pixel of the centred ``L x L`` grid, corners included."""
    return torch.round(radial_grid(L, 2, device=device)).long()


def _as_set_variance(noise_variance: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` or scalar per-pixel noise variance -> ``(B, 1, 1, 1)`` broadcastable tensor."""
    v = torch.as_tensor(noise_variance, dtype=like.dtype, device=like.device)
    return v.reshape(-1, 1, 1, 1) if v.ndim else v


def estimate_radial_spectrum(
    noisy: torch.Tensor, ctf: torch.Tensor, noise_variance: torch.Tensor | float
) -> torch.Tensor:
    """Least-squares radial power spectrum ``S`` of the projections of each set.

    Args:
        noisy: ``(B, N, L, L)`` images.
        ctf: ``(B, N, L, L)`` centred CTFs (ones when there is none).
        noise_variance: ``(B,)`` or scalar, per-pixel noise variance in image units.
    Returns:
        ``(B, R)`` with ``R = round(sqrt(2) * (L // 2)) + 1`` shells (corners included): ``S`` of shell
        ``r`` in units of ``E|DFT|^2``, i.e. ``L^2`` times the per-pixel variance of a white
        field with that spectrum. Clamped at 0.
    """
    B, L = noisy.shape[0], noisy.shape[-1]
    shells = _shells(L, noisy.device).flatten()
    n_shells = int(shells.max()) + 1
    excess = fft2c(noisy).abs().square() - L * L * _as_set_variance(noise_variance, noisy)
    c2 = ctf.square().expand_as(noisy)
    # Normal equation per shell: S = sum C^2 (|Y|^2 - L^2 sigma^2) / sum C^4.
    num = (c2 * excess).sum(1).reshape(B, -1)
    den = c2.square().sum(1).reshape(B, -1)
    num = num.new_zeros(B, n_shells).index_add_(1, shells, num)
    den = den.new_zeros(B, n_shells).index_add_(1, shells, den)
    return (num / den.clamp_min(torch.finfo(den.dtype).tiny)).clamp_min(0.0)


def wiener_filter(
    noisy: torch.Tensor,
    ctf: torch.Tensor,
    noise_variance: torch.Tensor | float,
    spectrum: torch.Tensor,
) -> torch.Tensor:
    """Filter each image with ``C^2 S / (C^2 S + L^2 sigma^2)`` for a given radial spectrum.

    Args:
        noisy: ``(B, N, L, L)``.
        ctf: ``(B, N, L, L)``.
        noise_variance: ``(B,)`` or scalar, per-pixel.
        spectrum: ``(B, R)`` as returned by :func:`estimate_radial_spectrum`.
    Returns:
        ``(B, N, L, L)`` estimate of the clean CTF-affected images.
    """
    L = noisy.shape[-1]
    s = spectrum[:, _shells(L, noisy.device)][:, None]  # (B, 1, L, L)
    signal = ctf.square() * s
    noise = L * L * _as_set_variance(noise_variance, noisy)
    gain = signal / (signal + noise).clamp_min(torch.finfo(noisy.dtype).tiny)
    return ifft2c(gain * fft2c(noisy)).real.to(noisy.dtype)


def wiener_denoise(
    noisy: torch.Tensor, ctf: torch.Tensor, noise_variance: torch.Tensor | float
) -> torch.Tensor:
    """Radial CTF-aware Wiener filter with the spectrum estimated from the set itself.

    Args:
        noisy: ``(B, N, L, L)`` noisy images (sets on the ``N`` axis).
        ctf: ``(B, N, L, L)`` centred CTFs, RELION sign (ones when the CTF is off).
        noise_variance: ``(B,)`` (or scalar) per-pixel noise variance, in image units.
    Returns:
        ``(B, N, L, L)`` estimate of the clean CTF-affected images.
    """
    return wiener_filter(noisy, ctf, noise_variance, estimate_radial_spectrum(noisy, ctf, noise_variance))
