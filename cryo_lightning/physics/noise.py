"""White Gaussian noise at a prescribed SNR, and noise/SNR estimates.

SNR definition (as ASPIRE's): the mean over a set of images of the mean squared value of the
clean (CTF-affected) images inside the inscribed disk, divided by the noise variance. Sets are
the ``N`` axis of ``(B, N, L, L)`` batches by default (``dim=-3``), giving one value per set.
"""

from __future__ import annotations

import torch

from cryo_lightning.physics.fourier import radial_grid

__all__ = [
    "disk_mask",
    "signal_power",
    "add_white_noise",
    "estimate_noise_variance",
    "empirical_snr",
]

Dims = int | tuple[int, ...] | None


def disk_mask(
    L: int, radius: float | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Pixels whose distance from ``(L // 2, L // 2)`` is **strictly less** than ``radius``.

    The strict inequality makes the default disk (``radius = L / 2``) symmetric about the centre for
    even ``L`` too (it excludes row/column 0, which has no mirror pixel).

    Returns:
        ``(L, L)`` bool.
    """
    radius = L / 2 if radius is None else radius
    return radial_grid(L, 2, device=device) < radius


def _power(clean: torch.Tensor, radius: float | None, dim: Dims) -> torch.Tensor:
    """Signal power with the reduced axes kept (size 1), including the two pixel axes."""
    mask = disk_mask(clean.shape[-1], radius, device=clean.device)
    power = (clean.square() * mask).sum((-2, -1), keepdim=True) / mask.sum()
    return power if dim is None else power.mean(dim, keepdim=True)


def _squeeze(x: torch.Tensor, dim: Dims) -> torch.Tensor:
    dims = (-2, -1) + (() if dim is None else (dim,) if isinstance(dim, int) else tuple(dim))
    return x.squeeze(dims)


def signal_power(clean: torch.Tensor, radius: float | None = None, dim: Dims = -3) -> torch.Tensor:
    """Mean squared value inside the disk of :func:`disk_mask`, averaged over the set axes ``dim``.

    Args:
        clean: ``(..., L, L)`` noise-free images, e.g. ``(B, N, L, L)``.
        radius: disk radius in pixels (default ``L / 2``).
        dim: axes of ``clean`` (not the last two) averaged over; ``None`` gives per-image power.
    Returns:
        ``clean.shape[:-2]`` without ``dim``, e.g. ``(B,)`` for ``(B, N, L, L)`` and ``dim=-3``.
    """
    return _squeeze(_power(clean, radius, dim), dim)


def add_white_noise(
    clean: torch.Tensor,
    snr: float | torch.Tensor,
    generator: torch.Generator | None = None,
    radius: float | None = None,
    dim: Dims = -3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add white Gaussian noise of variance ``signal_power(clean) / snr`` per set.

    Args:
        clean: ``(..., L, L)`` noise-free images, e.g. ``(B, N, L, L)``.
        snr: float or tensor of the shape :func:`signal_power` returns (e.g. ``(B,)``).
        generator: seeds the noise (it may live on the CPU while ``clean`` is on another device).
        radius, dim: as in :func:`signal_power`.
    Returns:
        ``(noisy, sigma2)``: noisy images like ``clean`` and the noise variance per set.
    """
    power = _power(clean, radius, dim)
    snr_t = torch.as_tensor(snr, dtype=clean.dtype, device=clean.device)
    sigma2 = _squeeze(power, dim) / snr_t
    gen_device = generator.device if generator is not None else clean.device
    noise = torch.randn(clean.shape, generator=generator, device=gen_device, dtype=clean.dtype)
    noise = noise.to(clean.device)
    return clean + noise * sigma2.reshape(power.shape).sqrt(), sigma2


def estimate_noise_variance(images: torch.Tensor, radius: float | None = None) -> torch.Tensor:
    """Per-image noise variance from the background (pixels outside :func:`disk_mask`).

    Uses the unbiased sample variance, so a constant background offset does not matter.

    Args:
        images: ``(..., L, L)``.
    Returns:
        ``(...)``.
    """
    background = ~disk_mask(images.shape[-1], radius, device=images.device)
    return images[..., background].var(dim=-1)


def empirical_snr(
    clean: torch.Tensor, noisy: torch.Tensor, radius: float | None = None, dim: Dims = -3
) -> torch.Tensor:
    """Measured SNR: :func:`signal_power` of ``clean`` over the variance of ``noisy - clean``.

    The noise variance uses every pixel of each image (the noise is white), averaged over ``dim``.
    Returns the shape :func:`signal_power` returns.
    """
    noise_var = (noisy - clean).flatten(-2).var(dim=-1)[..., None, None]
    if dim is not None:
        noise_var = noise_var.mean(dim, keepdim=True)
    return _squeeze(_power(clean, radius, dim) / noise_var, dim)
