"""Image-quality metrics shared by tasks and benchmarks (DESIGN §3)."""

from __future__ import annotations

import torch

from cryo_lightning.physics.fourier import fourier_shell_correlation

__all__ = ["relative_mse", "psnr", "frc_curve"]


def relative_mse(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image relative MSE ``||x_hat - x||^2 / ||x||^2``.

    Args:
        estimate, target: ``(..., L, L)``.
    Returns:
        ``(...)``; average it over images to get the reported number.
    """
    err = (estimate - target).square().sum((-2, -1))
    return err / target.square().sum((-2, -1)).clamp_min(torch.finfo(target.dtype).tiny)


def psnr(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB with the target's own peak-to-peak range as the data range.

    Args:
        estimate, target: ``(..., L, L)``.
    Returns:
        ``(...)`` dB.
    """
    mse = (estimate - target).square().mean((-2, -1))
    peak = target.amax((-2, -1)) - target.amin((-2, -1))
    return 10.0 * torch.log10(peak.square() / mse.clamp_min(torch.finfo(mse.dtype).tiny))


def frc_curve(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fourier ring correlation per image and one-pixel ring (see ``physics.fourier``).

    Args:
        estimate, target: ``(..., L, L)``.
    Returns:
        ``(..., L // 2 + 1)``.
    """
    return fourier_shell_correlation(estimate.float(), target.float(), ndim=2)
