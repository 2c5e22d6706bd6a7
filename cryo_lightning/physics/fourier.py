"""Centred Fourier transforms, Fourier crop/pad, radial shells and FRC/FSC.

Conventions (docs/conventions.md):
- The array centre is index ``L // 2`` on every axis, for even and odd ``L``.
- Centred transform: ``fftshift(fftn(ifftshift(x)))`` over the last ``ndim`` axes, unnormalised
  forward, ``1 / L**ndim`` on the inverse (numpy/torch default "backward" norm).
- Frequencies are in cycles per pixel: index ``i`` holds ``(i - L // 2) / L``; Nyquist is 0.5.
  Physical frequency is ``k / (L * pixel_size)`` in 1/Angstrom.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "fftc",
    "ifftc",
    "fft2c",
    "ifft2c",
    "fft3c",
    "ifft3c",
    "frequency_grid",
    "radial_grid",
    "fourier_resize",
    "downsample",
    "shell_average",
    "fourier_shell_correlation",
    "resolution_at",
]


def _dims(ndim: int) -> tuple[int, ...]:
    return tuple(range(-ndim, 0))


def fftc(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Centred FFT over the last ``ndim`` axes. ``(..., L, ..., L)`` real or complex -> complex."""
    d = _dims(ndim)
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=d), dim=d), dim=d)


def ifftc(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Inverse of :func:`fftc` (complex output; take ``.real`` for real signals)."""
    d = _dims(ndim)
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(x, dim=d), dim=d), dim=d)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred 2D FFT of images ``(..., L, L)``."""
    return fftc(x, 2)


def ifft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred inverse 2D FFT ``(..., L, L)`` (complex)."""
    return ifftc(x, 2)


def fft3c(x: torch.Tensor) -> torch.Tensor:
    """Centred 3D FFT of volumes ``(..., L, L, L)``."""
    return fftc(x, 3)


def ifft3c(x: torch.Tensor) -> torch.Tensor:
    """Centred inverse 3D FFT ``(..., L, L, L)`` (complex)."""
    return ifftc(x, 3)


def frequency_grid(
    L: int, ndim: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Centred frequency coordinates in cycles per pixel.

    Returns ``(ndim, L, ..., L)``: component ``j`` is the frequency along array axis ``j``
    (so for images ``[ky, kx]``, for volumes ``[kz, ky, kx]``).
    """
    k = (torch.arange(L, device=device, dtype=dtype) - L // 2) / L
    return torch.stack(torch.meshgrid(*([k] * ndim), indexing="ij"))


def radial_grid(
    L: int, ndim: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Distance of every sample from the centre ``L // 2`` in pixels (or Fourier index units).

    Returns ``(L, ..., L)`` with ``ndim`` axes.
    """
    r = torch.arange(L, device=device, dtype=dtype) - L // 2
    grids = torch.meshgrid(*([r] * ndim), indexing="ij")
    return torch.sqrt(sum(g * g for g in grids))


def _crop_or_pad(X: torch.Tensor, L_new: int, ndim: int) -> torch.Tensor:
    """Centred crop or zero pad of the last ``ndim`` axes, keeping index ``L // 2`` at ``L_new // 2``."""
    L = X.shape[-1]
    if L_new == L:
        return X
    if L_new < L:
        start = L // 2 - L_new // 2
        sl = (Ellipsis,) + (slice(start, start + L_new),) * ndim
        return X[sl]
    out = X.new_zeros(X.shape[:-ndim] + (L_new,) * ndim)
    start = L_new // 2 - L // 2
    sl = (Ellipsis,) + (slice(start, start + L),) * ndim
    out[sl] = X
    return out


def fourier_resize(x: torch.Tensor, L_new: int, ndim: int) -> torch.Tensor:
    """Resample real images or volumes to ``L_new`` samples per axis by Fourier crop or zero pad.

    The field of view is kept, so the pixel size becomes ``pixel_size * L / L_new``; pixel values
    are scaled so that the mean (and, below Nyquist, every Fourier coefficient's physical
    amplitude) is preserved.

    Args:
        x: ``(..., L, ..., L)`` real.
        L_new: new box size.
        ndim: 2 for images, 3 for volumes.
    """
    L = x.shape[-1]
    X = _crop_or_pad(fftc(x, ndim), L_new, ndim)
    return ifftc(X, ndim).real * (L_new / L) ** ndim


def downsample(
    x: torch.Tensor, L_new: int, pixel_size: float, ndim: int
) -> tuple[torch.Tensor, float]:
    """:func:`fourier_resize` that also returns the updated pixel size (Angstrom)."""
    L = x.shape[-1]
    return fourier_resize(x, L_new, ndim), pixel_size * L / L_new


def shell_average(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Average of ``values`` over one-pixel-wide shells around the centre.

    Args:
        values: ``(..., L, ..., L)`` real.
    Returns:
        ``(..., L // 2 + 1)``: shell ``k`` holds samples with ``round(r) == k``, up to Nyquist.
    """
    L = values.shape[-1]
    shells = torch.round(radial_grid(L, ndim, device=values.device)).long().flatten()
    n_shells = L // 2 + 1
    keep = shells < n_shells
    flat = values.flatten(-ndim)[..., keep]
    idx = shells[keep]
    sums = flat.new_zeros(flat.shape[:-1] + (n_shells,)).index_add_(-1, idx, flat)
    counts = torch.bincount(idx, minlength=n_shells).to(flat.dtype)
    return sums / counts


def fourier_shell_correlation(a: torch.Tensor, b: torch.Tensor, ndim: int) -> torch.Tensor:
    """FRC (``ndim=2``) or FSC (``ndim=3``) between two real signals, per one-pixel shell.

    Args:
        a, b: ``(..., L, ..., L)`` real, same shape.
    Returns:
        ``(..., L // 2 + 1)`` correlation per shell; shell ``k`` is frequency ``k / L`` cycles
        per pixel, i.e. ``k / (L * pixel_size)`` 1/Angstrom. Shells where either signal has no
        power (below the FFT's rounding level, i.e. ``(100 eps)**2`` times the mean power of all
        samples) get 0, not a ratio of rounding errors.
    """
    A, B = fftc(a, ndim), fftc(b, ndim)
    cross = shell_average((A * B.conj()).real, ndim)
    pa = shell_average(A.abs() ** 2, ndim)
    pb = shell_average(B.abs() ** 2, ndim)
    floor = (100 * torch.finfo(cross.dtype).eps) ** 2
    dims = tuple(range(-ndim, 0))
    mean_a = (A.abs() ** 2).mean(dims)[..., None]
    mean_b = (B.abs() ** 2).mean(dims)[..., None]
    empty = (pa <= floor * mean_a) | (pb <= floor * mean_b)
    corr = cross / torch.sqrt(pa * pb).clamp_min(torch.finfo(cross.dtype).tiny)
    return torch.where(empty, torch.zeros_like(corr), corr)


def resolution_at(curve: torch.Tensor, threshold: float, L: int, pixel_size: float) -> float:
    """Resolution (Angstrom) where a 1D FSC/FRC curve first falls below ``threshold``.

    The crossing is linearly interpolated between shells; shell 0 is ignored. If the curve never
    falls below the threshold, the Nyquist resolution ``2 * pixel_size`` is returned; if the
    interpolated crossing is at or below shell 0 (no correlation at all), ``inf``.

    Args:
        curve: ``(L // 2 + 1,)`` correlation per shell.
    """
    c = curve.detach().double().cpu()
    for k in range(1, c.numel()):
        if c[k] < threshold:
            c0, c1 = float(c[k - 1]), float(c[k])
            shell = (k - 1) + (c0 - threshold) / (c0 - c1) if c0 != c1 else float(k)
            if shell <= 0:
                return math.inf
            return L * pixel_size / shell
    return 2.0 * pixel_size
