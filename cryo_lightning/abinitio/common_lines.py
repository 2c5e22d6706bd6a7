"""Common lines between projection images (the first step of common-lines ab initio).

By the Fourier-slice theorem the central sections of two projections share one line: with
viewing directions ``d_i = A_i^T e_z``, its 3D direction is ``n = d_i x d_j``; in image ``i`` it
is the 2D direction ``A_i n`` (whose z component is 0), at angle ``theta_ij`` from +kx towards +ky.
Lines are compared as radial lines of the polar spectra (``physics.polar``), where
``F(r, theta + pi) = conj F(r, theta)`` for real images.
"""

from __future__ import annotations

import math

import torch

from cryo_lightning.physics.polar import PolarSpectrum

__all__ = ["common_line_angles", "detect_common_lines"]


def common_line_angles(rotations: torch.Tensor) -> torch.Tensor:
    """True common-line angles from RELION matrices ``(N, 3, 3)``.

    Returns:
        ``(N, N)`` radians in ``[0, 2 pi)``: entry ``[i, j]`` is the angle, in image ``i``, of the
        3D direction ``d_i x d_j`` (so ``[j, i]`` is that of the opposite direction; a line and
        its opposite are the same line). The diagonal is 0.
    """
    d = rotations[:, 2, :]  # viewing directions A^T e_z are the third rows
    n = torch.cross(d[:, None, :].expand(-1, len(d), -1), d[None, :, :].expand(len(d), -1, -1), dim=-1)
    c_i = torch.einsum("iab,ijb->ija", rotations, n)  # the line in image i's frame
    return torch.remainder(torch.atan2(c_i[..., 1], c_i[..., 0]), 2 * math.pi)


def detect_common_lines(
    images: torch.Tensor, n_angles: int = 360, n_radii: int | None = None, max_radius: float = 0.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Common lines of every pair of images by normalised cross-correlation of radial lines.

    Args:
        images: ``(N, L, L)`` (denoised, phase-flipped or CTF-free) projections.
        n_angles: angular sampling of the polar spectra over ``[0, 2 pi)`` (even).
        n_radii: radial samples from 0 to Nyquist (default ``L // 2 + 1``).
        max_radius: fraction of Nyquist used (high frequencies are mostly noise).
    Returns:
        ``(angles, scores)``: ``(N, N)`` detected angles (radians; entry ``[i, j]`` is the common
        line's angle in image ``i``, defined modulo ``pi`` since the direction along the line is
        not fixed by one pair) and the correlation of each pair's best match.
    """
    N, L = images.shape[0], images.shape[-1]
    R = n_radii or L // 2 + 1
    polar = PolarSpectrum(L, R, n_angles).to(images.device)
    lines = polar(images.float())[:, 1 : max(2, int(max_radius * (R - 1)) + 1)]  # (N, R', T), no DC
    lines = lines * torch.arange(1, lines.shape[1] + 1, device=images.device)[None, :, None]  # ramp weight
    lines = lines.transpose(1, 2)  # (N, T, R')
    lines = lines / lines.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    half = n_angles // 2
    # Line theta of image i against line phi in [0, pi) of image j; phi + pi is the conjugate line.
    corr = torch.einsum("itr,jpr->ijtp", lines, lines[:, :half].conj()).real  # (N, N, T, T/2)
    best = corr.flatten(-2).argmax(-1)
    scores = corr.flatten(-2).max(-1).values
    theta = (best // half).float() * (2 * math.pi / n_angles)  # the line's angle in image i
    angles = torch.where(torch.eye(N, dtype=torch.bool, device=images.device), torch.zeros_like(theta), theta)
    return angles, scores
