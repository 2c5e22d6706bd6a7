"""Rotational and translational alignment of images to references.

* Without shifts, in the steerable basis (:func:`align_coefficients`): rotations act exactly and
  the correlation over all angles is one FFT over the angular frequency ``k``.
* With shifts (:func:`align`): polar cross-correlation of the reference's and each image's
  spectra (:class:`~cryo_lightning.physics.polar.PolarSpectrum`, area-weighted, DC excluded),
  over all ``n_angles`` rotations at once by FFT along the angle, brute force over a square grid
  of shifts refined on finer local grids, with parabolic refinement of the peak.

Class averaging (:mod:`cryo_lightning.abinitio.class_average`) aligns the images of step 1 of
:mod:`cryo_lightning.abinitio.invariant_features` (denoised and CTF-free by default).

Conventions: angles in radians, counter-clockwise in the ``(x, y)`` frame (``rotate(I, a)(r) =
I(R_{-a} r)``, as ``FourierBesselBasis.rotate``); shifts in pixels, ``(x, y)`` order, as
:func:`~cryo_lightning.physics.projection.translate_spectrum` (``shift(I, t)(r) = I(r - t)``).
An alignment ``(angle, shift)`` of an image to a reference means
``shift(rotate(image, angle), shift) ~ reference``.
"""

from __future__ import annotations

import math

import torch

from cryo_lightning.abinitio.peaks import parabolic_offset
from cryo_lightning.physics.polar import PolarSpectrum
from cryo_lightning.physics.steerable_basis import FourierBesselBasis

__all__ = ["align", "align_coefficients"]


def _square_grid(n: int, step: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Shifts ``{-n .. n} * step`` per axis as ``((2n + 1)^2, 2)`` ``(x, y)``, row-major in ``(y, x)``."""
    offsets = torch.arange(-n, n + 1, device=device, dtype=dtype) * step
    ty, tx = torch.meshgrid(offsets, offsets, indexing="ij")
    return torch.stack([tx.flatten(), ty.flatten()], dim=-1)


class _PolarCorrelator:
    """Polar cross-correlations of references with images over all rotations, for given shifts.

    ``corr[..., s, a] = sum_r w_r sum_t X_s[r, t] conj(P[r, t - a])`` where ``X_s`` is the polar
    spectrum of ``shift(reference, -t_s)`` (``X(k) exp(+2 pi i k.t_s)``) and ``P`` the image's:
    the correlation of the reference with ``shift(rotate(image, 2 pi a / T), t_s)``, normalised.
    """

    # Complex elements per intermediate tensor (memory ~ 8 bytes each in float32).
    budget = 1 << 23

    def __init__(self, reference: torch.Tensor, images: torch.Tensor, n_angles: int, max_radius: float) -> None:
        L, device = images.shape[-1], images.device
        self.dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        R = L // 2 + 1
        polar = PolarSpectrum(L, R, n_angles).to(device)
        n_r = max(1, min(R - 1, int(max_radius / 0.5 * (R - 1))))
        self.rho = 0.5 * torch.arange(1, n_r + 1, device=device, dtype=self.dtype) / (R - 1)
        weight = self.rho[:, None]  # area element of the polar grid; DC excluded
        self.theta = 2 * math.pi * torch.arange(n_angles, device=device, dtype=self.dtype) / n_angles
        ref = polar(reference.to(self.dtype))[:, 1 : n_r + 1]  # (C, R', T)
        pm = polar(images.to(self.dtype))[:, :, 1 : n_r + 1]  # (C, k, R', T)
        self.weighted_ref = ref * weight
        self.image_fft_conj = torch.fft.fft(pm, dim=-1).conj()
        norm_r = (weight * ref.abs().square()).sum((-2, -1)).sqrt()
        norm_m = (weight * pm.abs().square()).sum((-2, -1)).sqrt()
        self.norm = (norm_r[:, None] * norm_m).clamp_min(torch.finfo(self.dtype).tiny)  # (C, k)

    def _phase(self, shifts: torch.Tensor) -> torch.Tensor:
        """``exp(+2 pi i k.t)`` on the polar grid for ``shifts (..., 2)``: ``(..., R', T)``."""
        sx, sy = shifts[..., 0, None, None], shifts[..., 1, None, None]
        kdot = self.rho[:, None] * (sx * torch.cos(self.theta) + sy * torch.sin(self.theta))
        return torch.polar(torch.ones_like(kdot), 2 * math.pi * kdot)

    def shared(self, shifts: torch.Tensor) -> torch.Tensor:
        """The same shifts ``(S, 2)`` for every pair: ``(C, k, S, T)``."""
        C, k, Rp, T = self.image_fft_conj.shape
        S = shifts.shape[0]
        phase = self._phase(shifts)  # (S, R', T), shared by all classes
        step = max(1, self.budget // (k * S * Rp * T))
        out = []
        for c in range(0, C, step):
            rows = slice(c, c + step)
            A = torch.fft.fft(self.weighted_ref[rows, None] * phase, dim=-1)  # (c, S, R', T)
            cross = torch.einsum("csrm,cjrm->cjsm", A, self.image_fft_conj[rows])  # batched matmul
            out.append(torch.fft.ifft(cross, dim=-1).real / self.norm[rows, :, None, None])
        return torch.cat(out)

    def per_pair(self, centres: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Shifts ``centres (C, k, 2) + offsets (S, 2)`` for each pair: ``(C, k, S, T)``."""
        C, k, Rp, T = self.image_fft_conj.shape
        S = offsets.shape[0]
        local = self._phase(offsets)  # exp(2 pi i k.(t + d)) = exp(2 pi i k.t) exp(2 pi i k.d)
        step = max(1, self.budget // (k * S * Rp * T))
        out = []
        for c in range(0, C, step):
            rows = slice(c, c + step)
            base = self.weighted_ref[rows, None] * self._phase(centres[rows])  # (c, k, R', T)
            A = torch.fft.fft(base[:, :, None] * local, dim=-1)  # (c, k, S, R', T)
            cross = (A * self.image_fft_conj[rows, :, None]).sum(-2)
            out.append(torch.fft.ifft(cross, dim=-1).real / self.norm[rows, :, None, None])
        return torch.cat(out)


def _peak(
    corr: torch.Tensor, candidates: torch.Tensor, n_grid: int, step: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rotation and shift of ``corr (C, k, S, T)`` over ``candidates (C, k, S, 2)``, a square
    ``n_grid x n_grid`` grid of spacing ``step`` (row-major in ``(y, x)``), refined parabolically.

    Returns:
        angles ``(C, k)`` radians in ``(-pi, pi]``, shifts ``(C, k, 2)``, peak scores ``(C, k)``.
    """
    T = corr.shape[-1]
    flat = corr.flatten(-2)
    best, arg = flat.max(-1)
    s_idx, a_idx = arg // T, arg % T

    def at(s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.gather(flat, -1, (s * T + a)[..., None])[..., 0]

    d_angle = parabolic_offset(at(s_idx, (a_idx - 1) % T), best, at(s_idx, (a_idx + 1) % T))
    angles = 2 * math.pi * (a_idx.to(corr.dtype) + d_angle) / T
    angles = math.pi - torch.remainder(math.pi - angles, 2 * math.pi)
    shifts = torch.gather(candidates, -2, s_idx[..., None, None].expand(*s_idx.shape, 1, 2))[..., 0, :]
    for axis, (i, stride) in enumerate(((s_idx % n_grid, 1), (s_idx // n_grid, n_grid))):
        inner = (i > 0) & (i < n_grid - 1)  # refine only between two grid neighbours
        lo = (s_idx - stride).clamp(0, n_grid * n_grid - 1)
        hi = (s_idx + stride).clamp(0, n_grid * n_grid - 1)
        d = parabolic_offset(at(lo, a_idx), best, at(hi, a_idx))
        shifts[..., axis] += torch.where(inner, d, torch.zeros_like(d)) * step
    return angles, shifts, best


def align(
    reference: torch.Tensor,
    images: torch.Tensor,
    *,
    n_angles: int = 360,
    max_shift: float = 0.0,
    shift_step: float = 1.0,
    max_radius: float = 0.4,
    refinements: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotational and translational alignment of images to references by polar cross-correlation.

    Maximises the area-weighted correlation of the polar spectra (radii ``1 / L`` apart up to
    ``max_radius`` cycles/pixel, DC excluded) over ``n_angles`` rotations (by FFT along the
    angle) and, by brute force, the square grid of shifts ``{-n .. n} * shift_step`` per axis
    (``n = floor(max_shift / shift_step)``). Each of ``refinements`` passes then searches all
    rotations again on a 3 x 3 grid of half the previous spacing around the current shift (a
    shift off the grid biases the best angle), and a last pass finds the angle at the final
    shift. Peaks are refined by parabolic interpolation along the angle and each shift axis.

    Args:
        reference: ``(..., L, L)`` real.
        images: ``(..., k, L, L)`` real; the leading axes match ``reference``'s.
        n_angles: rotations tried over ``[0, 2 pi)``.
        max_shift: largest shift per axis, pixels (0: rotation only).
        shift_step: spacing of the shift grid, pixels.
        max_radius: highest frequency compared, cycles/pixel (at most 0.5).
        refinements: shift refinement passes (used when ``max_shift > 0``).
    Returns:
        ``(angles, shifts, scores)``: ``(..., k)`` radians in ``(-pi, pi]``, ``(..., k, 2)``
        pixels ``(x, y)``, and ``(..., k)`` normalised correlations in ``[-1, 1]``, such that
        ``shift(rotate(image, angle), shift) ~ reference`` (see the module docstring).
    """
    L, k = images.shape[-1], images.shape[-3]
    lead = reference.shape[:-2]
    ref = reference.reshape(-1, L, L)
    img = images.reshape(-1, k, L, L)
    C = ref.shape[0]
    corr = _PolarCorrelator(ref, img, n_angles, max_radius)
    dtype, device = corr.dtype, images.device
    n_s = int(math.floor(max_shift / shift_step + 1e-9)) if max_shift > 0 else 0
    grid = _square_grid(n_s, shift_step, device, dtype)
    angles, shifts, scores = _peak(corr.shared(grid), grid.expand(C, k, -1, -1), 2 * n_s + 1, shift_step)
    if n_s > 0:
        step = shift_step
        for _ in range(refinements):
            step /= 2
            offsets = _square_grid(1, step, device, dtype)
            candidates = shifts[:, :, None] + offsets
            angles, shifts, scores = _peak(corr.per_pair(shifts, offsets), candidates, 3, step)
        zero = torch.zeros(1, 2, device=device, dtype=dtype)
        angles, _, scores = _peak(corr.per_pair(shifts, zero), shifts[:, :, None], 1, step)
    return angles.reshape(*lead, k), shifts.reshape(*lead, k, 2), scores.reshape(*lead, k)


def align_coefficients(
    reference: torch.Tensor,
    coeffs: torch.Tensor,
    basis: FourierBesselBasis,
    *,
    n_angles: int = 360,
    max_radius: float = 0.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotational alignment (no shifts) in the steerable basis, over all angles by one FFT.

    The basis is orthonormal and rotations act exactly (``a_kq -> exp(-i k a) a_kq``), so the
    correlation of the reference with the image rotated by ``a`` is
    ``Re sum_k w_k exp(i k a) sum_q r_kq conj(c_kq)`` (``w_0 = 1``, ``w_k = 2``: ``+-k``), the
    inner product of the images as the basis represents them. Only functions whose radial
    frequency ``z_kq / (pi L)`` is at most ``max_radius`` cycles/pixel take part.

    Args:
        reference: ``(..., count)`` complex coefficients in ``basis``.
        coeffs: ``(..., k, count)`` complex; the leading axes match ``reference``'s.
        basis: their :class:`FourierBesselBasis`.
        n_angles: rotations tried over ``[0, 2 pi)`` (the peak is refined parabolically).
        max_radius: band limit, cycles/pixel.
    Returns:
        ``(angles, scores)``: ``(..., k)`` radians in ``(-pi, pi]`` such that
        ``rotate(image, angle) ~ reference``, and normalised correlations.
    """
    device = coeffs.device
    freq = basis.angular_index.to(device)
    band = torch.cat(basis.zeros).to(device) <= math.pi * basis.L * max_radius
    w = torch.where(freq == 0, 1.0, 2.0).to(device) * band
    prod = reference[..., None, :] * coeffs.conj() * w
    d = prod.new_zeros(prod.shape[:-1] + (n_angles,)).index_add_(-1, freq % n_angles, prod)
    corr = torch.fft.ifft(d, dim=-1).real * n_angles  # corr[t] = Re sum_k d_k exp(2 pi i k t / T)
    norm_r = (w * reference.abs().square()).sum(-1).sqrt()
    norm_c = (w * coeffs.abs().square()).sum(-1).sqrt()
    corr = corr / (norm_r[..., None, None] * norm_c[..., None]).clamp_min(torch.finfo(corr.dtype).tiny)
    best, a_idx = corr.max(-1)
    left = torch.gather(corr, -1, ((a_idx - 1) % n_angles)[..., None])[..., 0]
    right = torch.gather(corr, -1, ((a_idx + 1) % n_angles)[..., None])[..., 0]
    angles = 2 * math.pi * (a_idx.to(corr.dtype) + parabolic_offset(left, best, right)) / n_angles
    return math.pi - torch.remainder(math.pi - angles, 2 * math.pi), best
