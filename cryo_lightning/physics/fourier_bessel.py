"""Spherical Fourier-Bessel (SFB) basis of volumes, in the Fourier domain.

A volume's spectrum (cycles/pixel, vectors ``(x, y, z)``) inside the ball ``|k| < c`` is::

    V_hat(k) = sum_{l, s, m} (-i)^l c_lsm j_ls(|k|) Y_lm(k / |k|),      c_lsm real,

where ``Y_lm`` are the real harmonics of :mod:`cryo_lightning.physics.spherical_harmonics`
(``z`` polar axis, layout ``m = -l..l``) and ``j_ls`` the normalised spherical Bessel functions
with their ``s``-th zero at the cut-off ``c``::

    j_ls(r) = sqrt(2 / c^3) / |j_{l+1}(z_ls)| * j_l(z_ls r / c),   r < c,   (0 beyond)

so that ``{j_ls Y_lm}`` is orthonormal on the ball. The factor ``(-i)^l`` makes the
coefficients of real volumes real (``Y_lm(-u) = (-1)^l Y_lm(u)``) and makes them the
coefficients of a real-space expansion ``V(x) = sum c_lsm g_ls(|x|) Y_lm(x / |x|)`` with real
radial functions ``g_ls`` (plane-wave expansion), so rotations and reflections act on ``c``
exactly as on real-space harmonics.

Truncation. ``S_l`` = number of zeros ``z_ls < 2 pi c R``, with ``R`` the real-space radius of
the object (pixels, default ``L / 2``) and ``c`` the band limit (cycles/pixel, default Nyquist
0.5), i.e. ``z_ls < pi L / 2`` by default (ASPIRE's rule, DESIGN section 4.5). Why: the inverse
transform of ``j_l(z r / c)`` on the ball oscillates with its outermost lobe at radius
``~ z / (2 pi c)`` pixels, so these are the functions whose real-space extent fits in ``R``;
counting them is the Nyquist count of a band-limited, ``R``-supported object (about ``(pi L)^3
/ 36`` functions against ``pi L^3 / 6`` Fourier samples in the ball for the full basis). The
degree is further capped by ``l_max`` to keep ``L = 32`` problems small.

Units. ``V_hat`` is the spectrum of the voxel array, ``sum_x V(x) exp(-2 pi i k.x)`` (``x`` in
pixels), which :func:`~cryo_lightning.physics.fourier.fft3c` samples at ``k = n / L``; hence
``||c||^2 ~= sum_voxels V^2`` for volumes in the span.

Coefficient layout: degree ``l`` ascending, then radial index ``s``, then ``m = -l..l``
(fastest), i.e. e3nn irreps ``"S_0x0e + S_1x1o + S_2x2e + ..."`` (parity ``(-1)^l``; see
:meth:`SFBLayout.irreps`).

Conventions pinned by tests/physics/test_fourier_bessel.py (docs/conventions.md section 15).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special

from cryo_lightning.physics.fourier import fft3c, ifft3c
from cryo_lightning.physics.spherical_harmonics import real_spherical_harmonics, wigner_d

__all__ = ["spherical_bessel_zeros", "SFBLayout", "SphericalFourierBesselBasis"]


def spherical_bessel_zeros(l: int, upper: float) -> np.ndarray:
    """Positive zeros of the spherical Bessel function ``j_l`` below ``upper``, ascending.

    The zeros of ``j_l`` are those of ``J_{l+1/2}``: all exceed ``l + 1/2`` and are more than
    ``pi`` apart, so sign changes on a grid of step 0.5 from ``l + 1/2`` bracket each exactly once;
    bisection then refines them to double precision.

    Returns:
        float64 array (possibly empty).
    """
    start = l + 0.5
    if upper <= start:
        return np.zeros(0)
    x = start + 0.5 * np.arange(int(math.ceil((upper - start) / 0.5)) + 2)
    f = special.spherical_jn(l, x)
    idx = np.nonzero(np.sign(f[:-1]) * np.sign(f[1:]) < 0)[0]
    lo, hi, f_lo = x[idx], x[idx + 1], f[idx]
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        f_mid = special.spherical_jn(l, mid)
        left = np.sign(f_mid) == np.sign(f_lo)
        lo, f_lo, hi = np.where(left, mid, lo), np.where(left, f_mid, f_lo), np.where(left, hi, mid)
    zeros = 0.5 * (lo + hi)
    return zeros[zeros < upper]


@dataclass(frozen=True)
class SFBLayout:
    """Layout of SFB coefficient vectors: ``l`` ascending, then ``s``, then ``m = -l..l``.

    Attributes:
        radial_counts: ``S_l`` for ``l = 0..l_max`` (may contain zeros).
    """

    radial_counts: tuple[int, ...]

    @property
    def l_max(self) -> int:
        return len(self.radial_counts) - 1

    @property
    def count(self) -> int:
        """Number of real coefficients ``sum_l S_l (2l + 1)``."""
        return sum(s * (2 * l + 1) for l, s in enumerate(self.radial_counts))

    def offset(self, l: int) -> int:
        """Index of the first coefficient of degree ``l``."""
        return sum(s * (2 * k + 1) for k, s in enumerate(self.radial_counts[:l]))

    def index(self, l: int, s: int, m: int) -> int:
        """Position of ``c_lsm`` (``s`` counted from 0)."""
        if not (0 <= l <= self.l_max and 0 <= s < self.radial_counts[l] and -l <= m <= l):
            raise IndexError(f"no coefficient (l={l}, s={s}, m={m}) in this layout")
        return self.offset(l) + s * (2 * l + 1) + (m + l)

    def lsm(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(count, 3)`` int64 table of ``(l, s, m)`` for every coefficient."""
        rows = [
            (l, s, m)
            for l, n in enumerate(self.radial_counts)
            for s in range(n)
            for m in range(-l, l + 1)
        ]
        return torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 3)

    def blocks(self, coeffs: torch.Tensor) -> list[torch.Tensor]:
        """Per-degree views ``(..., S_l, 2l + 1)`` of ``(..., count)`` coefficients."""
        sizes = [s * (2 * l + 1) for l, s in enumerate(self.radial_counts)]
        parts = torch.split(coeffs, sizes, dim=-1)
        return [p.unflatten(-1, (s, 2 * l + 1)) for l, (p, s) in enumerate(zip(parts, self.radial_counts))]

    def from_blocks(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`blocks`."""
        return torch.cat([b.flatten(-2) for b in blocks], dim=-1)

    def irreps(self) -> str:
        """e3nn irreps string, e.g. ``"15x0e+14x1o+14x2e"`` (degrees with ``S_l = 0`` omitted)."""
        parity = "eo"
        return "+".join(f"{s}x{l}{parity[l % 2]}" for l, s in enumerate(self.radial_counts) if s > 0)


class SphericalFourierBesselBasis:
    """SFB basis for ``L^3`` volumes (module docstring): expand, evaluate, rotate, reflect.

    Expansion is the least-squares fit of the centred 3D DFT samples inside the ball ``|k| < c``
    (equivalently, of the volume band-limited to that ball, in voxel space), solved by conjugate
    gradients on the normal equations, whose matrix is close to the identity. Volumes in the span
    round-trip to solver tolerance. Work per product is ``O(P (l_max + 1)^2)`` with ``P ~ (pi / 12)
    (2 c L)^3`` grid points in the half ball; the harmonics table is ``P x (l_max + 1)^2`` float64
    (16 MB at ``L = 32, l_max = 14``).

    Args:
        L: box size (pixels), volume centre at index ``L // 2``.
        l_max: highest degree; ``None`` keeps every degree with at least one zero below the
            cut-off (about ``pi L / 2``, thousands of coefficients at ``L = 32``).
        bandlimit: ``c``, cut-off frequency in cycles/pixel, ``0 < c <= 0.5``.
        radius: ``R``, real-space radius of the object in pixels (default ``L / 2``).
        device: where the tables live; inputs must be on it.

    Attributes:
        layout: :class:`SFBLayout`.
        zeros: per degree, the Bessel zeros ``z_ls`` (float64 numpy arrays).
    """

    def __init__(
        self,
        L: int,
        l_max: int | None = None,
        bandlimit: float = 0.5,
        radius: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0 < bandlimit <= 0.5:
            raise ValueError(f"bandlimit must be in (0, 0.5] cycles/pixel, got {bandlimit}")
        self.L, self.bandlimit = L, float(bandlimit)
        self.radius = float(L / 2 if radius is None else radius)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        cutoff = 2 * math.pi * self.bandlimit * self.radius
        # j_l has no zero below l + 1/2, so no degree beyond the cut-off can contribute.
        top = l_max if l_max is not None else int(cutoff)
        zeros = [spherical_bessel_zeros(l, cutoff) for l in range(top + 1)]
        if l_max is None:
            while zeros and len(zeros[-1]) == 0:
                zeros.pop()
        self.zeros: list[np.ndarray] = zeros
        self.layout = SFBLayout(tuple(len(z) for z in zeros))
        self._build_grid()

    # ----------------------------------------------------------------------------- tables
    def radial_functions(self, r: torch.Tensor) -> list[torch.Tensor]:
        """Radial functions ``j_ls(r)`` (0 for ``r >= c``), one ``(..., S_l)`` tensor per degree.

        Values come from scipy on the CPU (not differentiable in ``r``), float64 on ``r``'s device.

        Args:
            r: ``(...)`` frequencies in cycles/pixel.
        """
        c = self.bandlimit
        r_np = r.detach().to("cpu", torch.float64).numpy()
        inside = r_np < c
        out = []
        for l, z in enumerate(self.zeros):
            norm = math.sqrt(2.0 / c**3) / np.abs(special.spherical_jn(l + 1, z))
            vals = norm * special.spherical_jn(l, z * r_np[..., None] / c) * inside[..., None]
            out.append(torch.as_tensor(vals, dtype=torch.float64, device=r.device))
        return out

    def _build_grid(self) -> None:
        """Half-ball Fourier grid points, their mirrors, radii and harmonics."""
        L = self.L
        d = torch.arange(L, dtype=torch.int64) - L // 2
        dz, dy, dx = torch.meshgrid(d, d, d, indexing="ij")
        r2 = (dx * dx + dy * dy + dz * dz).flatten()
        dz, dy, dx = dz.flatten(), dy.flatten(), dx.flatten()
        in_ball = r2.double() < (self.bandlimit * L) ** 2
        # One of each pair (k, -k): F(-k) = conj F(k) for real volumes, and mirrors stay on the grid
        # because the strict ball excludes the unpaired even-L Nyquist planes.
        half = (dz > 0) | ((dz == 0) & (dy > 0)) | ((dz == 0) & (dy == 0) & (dx >= 0))
        sel = torch.nonzero(in_ball & half).flatten()
        c = L // 2
        mirror = ((c - dz[sel]) * L + (c - dy[sel])) * L + (c - dx[sel])
        origin = r2[sel] == 0
        r2_unique, radius_index = torch.unique(r2[sel], return_inverse=True)
        dev = self.device
        self._index = sel.to(dev)
        self._mirror = mirror.to(dev)
        self._weight = torch.where(origin, 1.0, 2.0).to(dev, torch.float64)  # each pair counts twice
        self._radius_index = radius_index.to(dev)
        self._n_radii = len(r2_unique)
        vec = torch.stack([dx[sel], dy[sel], dz[sel]], dim=-1).to(torch.float64) / L  # (x, y, z)
        self._sh = real_spherical_harmonics(self.layout.l_max, vec).to(dev)  # (P, (l_max+1)^2)
        self._radial = self.radial_functions(torch.sqrt(r2_unique.double()) / L)  # per l: (U, S_l)
        self._radial = [j.to(dev) for j in self._radial]

    # ----------------------------------------------------------------------------- operators
    @staticmethod
    def _phase(l: int) -> tuple[bool, float]:
        """``(-i)^l`` as (is imaginary, sign): 1, -i, -1, i, ..."""
        p = (-1j) ** l
        return (l % 2 == 1), (p.imag if l % 2 else p.real)

    def _synthesis(self, coeffs: torch.Tensor) -> torch.Tensor:
        """``(B, count)`` float64 -> spectrum at the half-ball points ``(B, P)`` complex128."""
        B, P = coeffs.shape[0], self._index.numel()
        re = coeffs.new_zeros(B, P)
        im = coeffs.new_zeros(B, P)
        for l, block in enumerate(self.layout.blocks(coeffs)):
            if block.shape[-2] == 0:
                continue
            t = torch.einsum("us,bsm->bum", self._radial[l], block)  # (B, U, 2l+1)
            vals = (t[:, self._radius_index] * self._sh[:, l * l : (l + 1) ** 2]).sum(-1)
            imaginary, sign = self._phase(l)
            (im if imaginary else re).add_(sign * vals)
        return torch.complex(re, im)

    def _analysis(self, values: torch.Tensor) -> torch.Tensor:
        """Adjoint of :meth:`_synthesis` for the weighted inner product ``sum_p w_p Re(conj(a) b)``."""
        B = values.shape[0]
        wv = values * self._weight
        blocks = []
        for l, S in enumerate(self.layout.radial_counts):
            imaginary, sign = self._phase(l)
            g = sign * (wv.imag if imaginary else wv.real)  # (B, P)
            per_point = g[:, :, None] * self._sh[:, l * l : (l + 1) ** 2]  # (B, P, 2l+1)
            per_radius = per_point.new_zeros(B, self._n_radii, 2 * l + 1).index_add_(1, self._radius_index, per_point)
            blocks.append(torch.einsum("us,bum->bsm", self._radial[l], per_radius))
        return self.layout.from_blocks(blocks)

    def _normal(self, coeffs: torch.Tensor) -> torch.Tensor:
        return self._analysis(self._synthesis(coeffs)) / self.L**3

    # ----------------------------------------------------------------------------- public API
    def fourier_grid(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Centred spectrum on the ``L^3`` DFT grid (``fft3c`` layout), zero outside the ball.

        Args:
            coeffs: ``(..., count)`` real.
        Returns:
            ``(..., L, L, L)`` complex128.
        """
        batch = coeffs.shape[:-1]
        c = coeffs.reshape(-1, self.layout.count).to(self.device, torch.float64)
        half = self._synthesis(c)
        full = half.new_zeros(c.shape[0], self.L**3)
        full[:, self._mirror] = half.conj()
        full[:, self._index] = half
        return full.reshape(batch + (self.L,) * 3)

    def evaluate(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Voxel volume of coefficients: ``Re ifft3c`` of :meth:`fourier_grid`.

        Args:
            coeffs: ``(..., count)`` real.
        Returns:
            ``(..., L, L, L)`` ``(z, y, x)``, in the dtype of ``coeffs``.
        """
        return ifft3c(self.fourier_grid(coeffs)).real.to(coeffs.dtype)

    def fourier_values(self, coeffs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Spectrum ``V_hat(k)`` at arbitrary frequencies (e.g. central slices).

        Args:
            coeffs: ``(count,)`` or ``(B, count)`` real.
            k: ``(..., 3)`` frequencies in cycles/pixel, ``(x, y, z)``; ``0`` beyond the cut-off.
        Returns:
            ``(...)`` or ``(B, ...)`` complex128.
        """
        single = coeffs.ndim == 1
        c = coeffs.reshape(-1, self.layout.count).to(k.device, torch.float64)
        k64 = k.to(torch.float64)
        sh = real_spherical_harmonics(self.layout.l_max, k64)
        radial = self.radial_functions(k64.norm(dim=-1))
        out = torch.zeros((c.shape[0],) + k.shape[:-1], dtype=torch.complex128, device=k.device)
        for l, block in enumerate(self.layout.blocks(c)):
            vals = torch.einsum("...s,bsm,...m->b...", radial[l], block, sh[..., l * l : (l + 1) ** 2])
            out = out + complex((-1j) ** l) * vals
        return out[0] if single else out

    def expand(self, volume: torch.Tensor, tol: float = 1e-10, max_iter: int = 200) -> torch.Tensor:
        """Least-squares SFB coefficients of voxel volumes.

        Minimises ``sum_{|k_n| < c} |V_hat_c(k_n) - fft3c(volume)[n]|^2`` over the DFT grid, by
        conjugate gradients (float64) until the relative residual of the normal equations is
        below ``tol``. Content outside the ball (and beyond the degree cap) is discarded.

        Args:
            volume: ``(..., L, L, L)`` real, ``(z, y, x)``, centre at index ``L // 2``.
            tol: relative residual at which to stop.
            max_iter: iteration cap.
        Returns:
            ``(..., count)`` in the volume's dtype.
        """
        batch = volume.shape[:-3]
        v = volume.reshape((-1,) + (self.L,) * 3).to(self.device, torch.float64)
        y = fft3c(v).reshape(v.shape[0], -1)[:, self._index]
        b = self._analysis(y) / self.L**3
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rr = (r * r).sum(-1, keepdim=True)
        stop = (tol**2) * (b * b).sum(-1, keepdim=True)
        for _ in range(max_iter):
            if bool((rr <= stop).all()):
                break
            ap = self._normal(p)
            alpha = rr / (p * ap).sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
            x = x + alpha * p
            r = r - alpha * ap
            rr_new = (r * r).sum(-1, keepdim=True)
            p = r + (rr_new / rr.clamp_min(torch.finfo(torch.float64).tiny)) * p
            rr = rr_new
        return x.reshape(batch + (self.layout.count,)).to(volume.dtype)

    def rotate(self, coeffs: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """Coefficients of the rotated volume ``V_R(x) = V(R^T x)``: ``c_l -> D_l(R) c_l``.

        ``V_R_hat(k) = V_hat(R^T k)`` and ``Y_l(R^T u) = D_l(R)^T Y_l(u)``, so each block
        ``(S_l, 2l+1)`` is multiplied by ``D_l(R)^T`` on the right. For a RELION pose ``A``, the
        identity-pose projection of ``V_A`` is the projection of ``V`` at ``A``.

        Args:
            coeffs: ``(..., count)`` real.
            rotation: ``(3, 3)`` or ``(..., 3, 3)`` (broadcast against ``coeffs``' batch).
        Returns:
            ``(..., count)``.
        """
        d = wigner_d(self.layout.l_max, rotation.to(coeffs.dtype))
        blocks = [b @ d[l].transpose(-1, -2) for l, b in enumerate(self.layout.blocks(coeffs))]
        return self.layout.from_blocks(blocks)

    def reflection_signs(self, axis: str = "z") -> torch.Tensor:
        """Signs ``(count,)`` by which :meth:`reflect` multiplies the coefficients."""
        lsm = self.layout.lsm(self.device)
        l, m = lsm[:, 0], lsm[:, 2]
        odd_m = torch.remainder(m, 2) == 1
        if axis == "z":  # theta -> pi - theta: P_l^m(-t) = (-1)^(l+m) P_l^m(t)
            flip = torch.remainder(l + m, 2) == 1
        elif axis == "y":  # phi -> -phi: sin(m phi) changes sign
            flip = m < 0
        elif axis == "x":  # phi -> pi - phi: cos(m phi) -> (-1)^m cos, sin(m phi) -> -(-1)^m sin
            flip = torch.where(m >= 0, odd_m, ~odd_m)
        else:
            raise ValueError(f"axis must be 'x', 'y' or 'z', got {axis!r}")
        return torch.where(flip, -1.0, 1.0).to(torch.float64)

    def reflect(self, coeffs: torch.Tensor, axis: str = "z") -> torch.Tensor:
        """Coefficients of the mirrored volume ``V(J x)``, ``J`` negating one coordinate axis.

        The default ``axis="z"``, ``J = diag(1, 1, -1)``, is the mirror of
        :func:`~cryo_lightning.physics.rotations.register_rotations`: ``c_lsm -> (-1)^(l+m) c_lsm``,
        i.e. flipping the volume's first array axis about index ``L // 2``. ``"y"``: ``c_lsm ->
        -c_lsm`` for ``m < 0``; ``"x"``: ``(-1)^m`` for ``m >= 0``, ``-(-1)^m`` for ``m < 0``.
        The point inversion ``V(-x)`` is the product of the three, ``(-1)^l``.

        Args:
            coeffs: ``(..., count)`` real.
            axis: ``"x"``, ``"y"`` or ``"z"``.
        """
        return coeffs * self.reflection_signs(axis).to(coeffs)
