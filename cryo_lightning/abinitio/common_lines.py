"""Common lines between projection images (the first step of common-lines ab initio).

By the Fourier-slice theorem the central sections of two projections share one line: with
viewing directions ``d_i = A_i^T e_z``, its 3D direction is ``n = d_i x d_j``; in image ``i`` it
is the 2D direction ``A_i n`` (whose z component is 0), at angle ``theta_ij`` from +kx towards +ky.
Lines are compared as radial lines of the polar spectra (``physics.polar``), where
``F(r, theta + pi) = conj F(r, theta)`` for real images.

Orientation. A detected pair of angles ``(theta_ij, theta_ji)`` describes *one* 3D direction
``n_ij`` seen in both images (``A_i^T c_ij = A_j^T c_ji``), but whether that is ``+n`` or ``-n``
is arbitrary per pair. Everything downstream (``abinitio.synchronization``) only uses
combinations that are invariant to flipping both angles of a pair by ``pi``.
"""

from __future__ import annotations

import math

import torch

from cryo_lightning.abinitio.peaks import parabolic_offset
from cryo_lightning.physics.polar import PolarSpectrum

__all__ = ["common_line_angles", "detect_common_lines", "radial_lines"]


def common_line_angles(rotations: torch.Tensor) -> torch.Tensor:
    """True common-line angles from RELION matrices ``(N, 3, 3)``.

    Returns:
        ``(N, N)`` radians in ``[0, 2 pi)``: entry ``[i, j]`` is the angle, in image ``i``, of the
        3D direction ``n_ij = d_min(i,j) x d_max(i,j)``, so ``[i, j]`` and ``[j, i]`` are one
        oriented direction, as :func:`detect_common_lines` returns them. The diagonal is 0.
    """
    d = rotations[:, 2, :]  # viewing directions A^T e_z are the third rows
    n = torch.cross(d[:, None, :].expand(-1, len(d), -1), d[None, :, :].expand(len(d), -1, -1), dim=-1)
    n = n * torch.tril(torch.full((len(d), len(d)), -2.0, dtype=d.dtype, device=d.device), -1).add(1)[..., None]
    c_i = torch.einsum("iab,ijb->ija", rotations, n)  # the line in image i's frame
    return torch.remainder(torch.atan2(c_i[..., 1], c_i[..., 0]), 2 * math.pi)


def radial_lines(
    images: torch.Tensor, n_angles: int = 360, n_radii: int | None = None, max_radius: float = 0.4,
) -> torch.Tensor:
    """Normalised, ramp-weighted radial Fourier lines, real and imaginary parts side by side.

    Args:
        images: ``(N, L, L)`` projections.
        n_angles: ``T`` angles over ``[0, 2 pi)`` (even).
        n_radii: radial samples from 0 to Nyquist (default ``L // 2 + 1``).
        max_radius: fraction of Nyquist kept (the DC sample is dropped).
    Returns:
        ``(N, T, 2 R')`` float: the dot product of two rows is ``Re <F_i(theta), F_j(phi)>`` of the
        unit-norm lines, i.e. their normalised cross-correlation.
    """
    L = images.shape[-1]
    R = n_radii or L // 2 + 1
    polar = PolarSpectrum(L, R, n_angles).to(images.device)
    lines = polar(images.float())[:, 1 : max(2, int(max_radius * (R - 1)) + 1)]  # (N, R', T)
    # The ramp |k| weights each radius by its share of the 2D plane (as in filtered back-projection).
    lines = lines * torch.arange(1, lines.shape[1] + 1, device=images.device)[None, :, None]
    lines = lines.transpose(1, 2)
    lines = lines / lines.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.cat([lines.real, lines.imag], dim=-1)


def _search(lines: torch.Tensor, stride: int, max_entries: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best ``(theta, phi)`` line indices and correlation for every pair ``i < j``, every
    ``stride``-th line only. Returns three ``(N, N)`` tensors (upper triangle filled)."""
    N, T = lines.shape[:2]
    sub = lines[:, ::stride]
    Ts, half = sub.shape[1], sub.shape[1] // 2
    theta_idx = torch.zeros(N, N, dtype=torch.long, device=lines.device)
    phi_idx = torch.zeros_like(theta_idx)
    scores = torch.zeros(N, N, dtype=lines.dtype, device=lines.device)
    block = max(1, max_entries // (Ts * half))
    for i in range(N - 1):
        for start in range(i + 1, N, block):
            js = torch.arange(start, min(start + block, N), device=lines.device)
            # (J, phi, theta): reducing over the contiguous last axis first is the fast order.
            corr = torch.einsum("tr,jpr->jpt", sub[i], sub[js, :half])
            over_theta = corr.max(-1)
            best = over_theta.values.max(-1)
            phi_idx[i, js] = best.indices * stride
            theta_idx[i, js] = over_theta.indices.gather(1, best.indices[:, None])[:, 0] * stride
            scores[i, js] = best.values
    return theta_idx, phi_idx, scores


def _local_search(
    lines: torch.Tensor, i: torch.Tensor, j: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor,
    radius: int, chunk: int = 2**16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best line pair within ``+-radius`` samples of ``(theta, phi)`` for pairs ``(i, j)`` (1D)."""
    T = lines.shape[1]
    window = torch.arange(-radius, radius + 1, device=lines.device)
    w = len(window)
    out_t, out_p, out_s = torch.empty_like(theta), torch.empty_like(phi), torch.empty(len(i), dtype=lines.dtype, device=lines.device)
    for s in range(0, len(i), chunk):
        sl = slice(s, s + chunk)
        ts = (theta[sl, None] + window) % T
        ps = (phi[sl, None] + window) % T
        a = lines[i[sl, None], ts]  # (P, w, 2R')
        b = lines[j[sl, None], ps]
        corr = torch.einsum("ptr,pqr->ptq", a, b).flatten(1)
        best = corr.max(-1)
        out_t[sl] = ts.gather(1, (best.indices // w)[:, None])[:, 0]
        out_p[sl] = ps.gather(1, (best.indices % w)[:, None])[:, 0]
        out_s[sl] = best.values
    return out_t, out_p, out_s


def detect_common_lines(
    images: torch.Tensor, n_angles: int = 360, n_radii: int | None = None, max_radius: float = 0.4,
    coarse: int = 3, refine: bool = True, max_entries: int = 2**26,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Common lines of every pair of images by normalised cross-correlation of radial lines.

    Every line ``theta`` in ``[0, 2 pi)`` of image ``i`` is compared with every line ``phi`` in
    ``[0, pi)`` of image ``j``; with the conjugate symmetry this covers all pairs of oriented lines.
    The exhaustive search runs on every ``coarse``-th line (the correlation peak is several
    degrees wide, so a grid of 3 degrees finds it), then on all lines within ``coarse`` steps
    of the coarse peak, then below the grid step by parabolic interpolation. The work is one
    matrix product per image, so it runs on the GPU when the images are there.

    Args:
        images: ``(N, L, L)`` (denoised, phase-flipped or CTF-free) projections, centred.
        n_angles: angular sampling of the polar spectra over ``[0, 2 pi)`` (a multiple of
            ``2 * coarse``).
        n_radii: radial samples from 0 to Nyquist (default ``L // 2 + 1``).
        max_radius: fraction of Nyquist used (high frequencies are mostly noise).
        coarse: stride of the exhaustive search (1: exhaustive on the full grid).
        refine: refine each peak below the grid step by parabolic interpolation.
        max_entries: correlation entries computed at once (memory).
    Returns:
        ``(angles, scores)``: ``(N, N)`` angles in radians in ``[0, 2 pi)`` (entry ``[i, j]`` is the
        common line in image ``i``; ``[i, j]`` and ``[j, i]`` are the same 3D direction, whose sign
        is arbitrary per pair) and the correlation of each pair's best match (symmetric).
    """
    N, T = images.shape[0], n_angles
    if T % (2 * coarse):
        raise ValueError(f"n_angles ({T}) must be a multiple of 2 * coarse ({2 * coarse})")
    lines = radial_lines(images, n_angles, n_radii, max_radius)  # (N, T, 2R')
    theta_idx, phi_idx, scores = _search(lines, coarse, max_entries)
    iu = torch.triu_indices(N, N, 1, device=images.device)
    i, j = iu[0], iu[1]
    t, p, best = theta_idx[i, j], phi_idx[i, j], scores[i, j]
    if coarse > 1:
        t, p, best = _local_search(lines, i, j, t, p, coarse)
    t_frac, p_frac = t.double(), p.double()
    if refine:
        def corr_at(dt: int, dp: int) -> torch.Tensor:
            return (lines[i, (t + dt) % T] * lines[j, (p + dp) % T]).sum(-1).double()
        c0 = corr_at(0, 0)
        t_frac = t_frac + parabolic_offset(corr_at(-1, 0), c0, corr_at(1, 0))
        p_frac = p_frac + parabolic_offset(corr_at(0, -1), c0, corr_at(0, 1))
    step = 2 * math.pi / T
    angles = torch.zeros(N, N, dtype=torch.float64, device=images.device)
    angles[i, j] = torch.remainder(t_frac * step, 2 * math.pi)
    angles[j, i] = torch.remainder(p_frac * step, 2 * math.pi)
    sym = torch.zeros(N, N, dtype=best.dtype, device=images.device)
    sym[i, j] = best
    sym[j, i] = best
    return angles.to(images.dtype if images.is_floating_point() else torch.float32), sym
