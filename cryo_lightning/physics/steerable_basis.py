"""Steerable 2D Fourier-Bessel basis on the disk inscribed in the image.

Basis functions (pixel units, polar coordinates about the centre pixel ``L // 2``)::

    phi_kq(r, theta) = u_kq(r) exp(i k theta),   u_kq(r) ~ J_k(z_kq r / R)  for r < R = L / 2,

with ``z_kq`` the ``q``-th positive zero of ``J_k`` and ``theta = atan2(y, x)``, where ``y`` runs
along array axis -2 and ``x`` along axis -1. Only ``z_kq < pi L / 2`` are kept: the radial
frequency of ``phi_kq`` is about ``z_kq / (2 pi R)`` cycles per pixel, so this keeps the functions
below Nyquist (ASPIRE's ``FBBasis2D`` truncation rule). A real image is represented by the complex
coefficients ``a_kq`` for ``k >= 0`` (``a_0q`` real)::

    image = sum_q a_0q u_0q + 2 Re sum_{k >= 1, q} a_kq phi_kq,   a_kq = sum_pixels image conj(phi_kq).

The radial functions of each angular frequency ``k`` are orthonormalised on the pixel grid
(symmetric, Loewdin orthonormalisation of the analytically normalised Bessel functions), so that
``sum_pixels conj(phi_kq) phi_kq' = delta_qq'`` exactly; functions of different ``k`` are
orthogonal up to the (small) error of sampling the disk on a square grid. White pixel noise of
variance ``sigma^2`` therefore has coefficients of variance ``sigma^2`` (circular complex for
``k >= 1``), and rotating an image by ``alpha`` (counter-clockwise in the ``(x, y)`` frame, i.e.
``I'(r, theta) = I(r, theta - alpha)``) multiplies ``a_kq`` by ``exp(-i k alpha)``.

Radial Fourier filters (a CTF averaged over angle) act block-diagonally in ``k``: see
:meth:`FourierBesselBasis.radial_operator`.

Reference: Bhamre, Zhang & Singer (2016), J. Struct. Biol. 195:72; Zhao & Singer (2013), JOSA A
30:871 (the truncation rule).
"""

from __future__ import annotations

import functools
import math

import torch

from cryo_lightning.physics.fourier import fft2c, radial_grid
from cryo_lightning.physics.noise import disk_mask

__all__ = ["bessel_j", "bessel_j_zeros", "FourierBesselBasis", "fourier_bessel_basis"]

# Radial bins (Fourier pixels) in which CTFs are averaged over angle for the block operators.
_BIN_WIDTH = 0.5


def bessel_j(order: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bessel function of the first kind ``J_order(x)``, in float64, pure torch.

    Uses Bessel's integral ``J_n(x) = (1 / 2 pi) int_0^{2 pi} cos(n t - x sin t) dt``: the
    trapezoidal rule with ``M`` points is exact up to aliased terms ``J_{M - n}(x)``, which are
    below double precision for ``M >= n + |x| + 12 |x|^(1/3) + 24`` (Debye's asymptotics: ``J_nu(x)
    ~ exp(-(2 m)^(3/2) / (3 sqrt(x)))`` for ``nu = x + m``).

    Args:
        order: integer order ``n >= 0``, or an integer tensor broadcastable against ``x``.
        x: real tensor.
    Returns:
        float64 tensor of the broadcast shape.
    """
    order_t = torch.as_tensor(order, dtype=torch.float64, device=x.device)
    x64, order_t = torch.broadcast_tensors(x.to(torch.float64), order_t)
    shape = x64.shape
    flat, flat_order = x64.reshape(-1), order_t.reshape(-1)
    if flat.numel() == 0:
        return x64.clone()
    # Points that need few quadrature nodes are evaluated with few: sort by need, chunk.
    need = flat_order.abs() + flat.abs() + 12 * flat.abs().pow(1 / 3) + 24
    order_idx = torch.argsort(need)
    out = torch.empty_like(flat)
    chunk = 1 << 13
    for s in range(0, flat.numel(), chunk):
        sel = order_idx[s : s + chunk]
        n_t = int(math.ceil(float(need[sel].max())))
        t = torch.arange(n_t, dtype=torch.float64, device=x.device) * (2 * math.pi / n_t)
        out[sel] = torch.cos(flat_order[sel, None] * t - flat[sel, None] * torch.sin(t)).mean(-1)
    return out.reshape(shape)


def bessel_j_zeros(order: int, upper: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Positive zeros of ``J_order`` below ``upper``, ascending, float64 (see :func:`_zeros_below`)."""
    zeros, _ = _zeros_below(upper, max_order=order, min_order=order, device=device)
    return zeros


def _zeros_below(
    upper: float, max_order: int | None = None, min_order: int = 0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All positive zeros ``z`` of ``J_n`` below ``upper`` for ``min_order <= n <= max_order``.

    The zeros are bracketed on grids of step 0.25 (consecutive zeros are more than 3 apart)
    starting at ``x = n`` (``J_n`` has no zero in ``(0, n]``, and starting there avoids the region
    where ``J_n`` underflows), then refined by bisection to double precision, all orders at once.

    Returns:
        zeros and their orders (int64), sorted by order then value.
    """
    step = 0.25
    top = int(math.ceil(upper)) if max_order is None else max_order
    orders, xs = [], []
    for n in range(min_order, top + 1):
        if upper <= n:
            break
        x = n + step * torch.arange(int(math.ceil((upper - n) / step)) + 2, dtype=torch.float64)
        orders.append(torch.full_like(x, n))
        xs.append(x)
    if not xs:
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        return empty, empty.long()
    order = torch.cat(orders).to(device)
    x = torch.cat(xs).to(device)
    f = bessel_j(order, x)
    same_order = order[:-1] == order[1:]
    idx = torch.nonzero(same_order & (torch.sign(f[:-1]) * torch.sign(f[1:]) < 0)).flatten()
    lo, hi, f_lo, n = x[idx], x[idx + 1], f[idx], order[idx]
    for _ in range(56):
        mid = 0.5 * (lo + hi)
        f_mid = bessel_j(n, mid)
        left = torch.sign(f_mid) == torch.sign(f_lo)
        lo, f_lo = torch.where(left, mid, lo), torch.where(left, f_mid, f_lo)
        hi = torch.where(left, hi, mid)
    zeros = 0.5 * (lo + hi)
    keep = zeros < upper
    return zeros[keep], n[keep].long()


class FourierBesselBasis:
    """Steerable Fourier-Bessel basis for ``L x L`` images (see the module docstring).

    Coefficients are complex tensors ``(..., count)``, ordered by angular frequency ``k`` then
    radial index ``q``; ``angular_index`` and ``radial_index`` give ``(k, q)`` of each entry and
    :meth:`split` cuts them into per-``k`` blocks ``(..., Q_k)``.

    Args:
        L: image size in pixels.
        device: where the basis lives (inputs must be on the same device).
        dtype: real dtype of the pixel-domain matrices (float32 or float64).

    Attributes:
        L, radius: image size and disk radius ``L / 2`` (pixels).
        block_sizes: ``Q_k`` for ``k = 0 .. k_max`` (list of int).
        zeros: per ``k``, the Bessel zeros ``z_kq`` (float64 tensors).
        count: number of complex coefficients ``sum_k Q_k`` (the real dimension is
            ``Q_0 + 2 sum_{k>=1} Q_k``).
        angular_index, radial_index: ``(count,)`` int64.
    """

    def __init__(self, L: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.L, self.radius = L, L / 2
        self.device, self.dtype = torch.device(device) if device is not None else torch.device("cpu"), dtype
        cutoff = math.pi * L / 2
        zeros, orders = _zeros_below(cutoff)
        self.zeros: list[torch.Tensor] = [zeros[orders == k] for k in range(int(orders.max()) + 1)]
        self.block_sizes = [len(z) for z in self.zeros]
        self.count = sum(self.block_sizes)
        self.angular_index = torch.cat(
            [torch.full((q,), k, dtype=torch.int64) for k, q in enumerate(self.block_sizes)]
        ).to(self.device)
        self.radial_index = torch.cat([torch.arange(q) for q in self.block_sizes]).to(self.device)

        self._mask_cpu = disk_mask(L)
        self._radial = self._orthonormal_radial_functions()  # per k: (Q_k, P) float64 on the disk pixels
        self._synthesis = self._real_synthesis_matrix().to(self.device, dtype)  # (P, Q_0 + 2 sum Q_k)
        self._mask = self._mask_cpu.to(self.device)
        self._fourier_blocks: list[torch.Tensor] | None = None  # per k: (n_bins, Q_k, Q_k) float64

    # ----------------------------------------------------------------------------- construction
    def _polar(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Radius and angle ``atan2(y, x)`` of the disk pixels (float64, row-major order)."""
        c = torch.arange(self.L, dtype=torch.float64) - self.L // 2
        y, x = torch.meshgrid(c, c, indexing="ij")
        return torch.sqrt(x * x + y * y)[self._mask_cpu], torch.atan2(y, x)[self._mask_cpu]

    def _orthonormal_radial_functions(self) -> list[torch.Tensor]:
        r, _ = self._polar()
        r2 = torch.round(r * r).long()  # exact: radii of grid points are square roots of integers
        r2_unique, inverse = torch.unique(r2, return_inverse=True)
        r_unique = torch.sqrt(r2_unique.to(torch.float64))
        R = self.radius
        z = torch.cat(self.zeros)
        k_of = torch.cat([torch.full((len(zk),), k, dtype=torch.float64) for k, zk in enumerate(self.zeros)])
        # Analytic normalisation: int_disk |phi|^2 dA = 1 (pixel area 1).
        norm = math.sqrt(math.pi) * R * bessel_j(k_of + 1, z).abs()
        values = bessel_j(k_of[:, None], z[:, None] * r_unique[None, :] / R) / norm[:, None]
        out = []
        for u in torch.split(values, self.block_sizes):
            u = u[:, inverse]  # (Q, P)
            # Loewdin: the closest grid-orthonormal set, and the same radial mixing for all angles,
            # so steerability is kept exactly.
            evals, evecs = torch.linalg.eigh(u @ u.T)
            out.append((evecs * evals.rsqrt()) @ evecs.T @ u)
        return out

    def _real_synthesis_matrix(self) -> torch.Tensor:
        """Columns: ``u_0q``; then ``u_kq cos(k theta)`` for ``k >= 1``; then ``u_kq sin(k theta)``."""
        _, theta = self._polar()
        cos_cols, sin_cols = [], []
        for k in range(1, len(self._radial)):
            cos_cols.append(self._radial[k] * torch.cos(k * theta))
            sin_cols.append(self._radial[k] * torch.sin(k * theta))
        return torch.cat([self._radial[0]] + cos_cols + sin_cols).T.contiguous()

    # ------------------------------------------------------------------------- coefficients
    def split(self, coeffs: torch.Tensor) -> list[torch.Tensor]:
        """Per-``k`` blocks ``(..., Q_k)`` of coefficients ``(..., count)`` (views)."""
        return list(torch.split(coeffs, self.block_sizes, dim=-1))

    def expand(self, images: torch.Tensor) -> torch.Tensor:
        """Coefficients ``a_kq = sum_pixels image conj(phi_kq)`` of real images.

        This is the orthogonal projection onto the basis up to the grid's cross-``k`` coupling;
        pixels outside the disk are ignored.

        Args:
            images: ``(..., L, L)`` real, on the basis' device.
        Returns:
            ``(..., count)`` complex (``a_0q`` real).
        """
        v = images[..., self._mask].to(self._synthesis.dtype) @ self._synthesis
        q0, qk = self.block_sizes[0], self.count - self.block_sizes[0]
        a0 = v[..., :q0]
        ak = torch.complex(v[..., q0 : q0 + qk], -v[..., q0 + qk :])
        return torch.cat([torch.complex(a0, torch.zeros_like(a0)), ak], dim=-1)

    def evaluate(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Real images from coefficients (0 outside the disk).

        Args:
            coeffs: ``(..., count)`` complex (the imaginary part of ``a_0q`` is ignored).
        Returns:
            ``(..., L, L)`` in the basis' real dtype.
        """
        q0 = self.block_sizes[0]
        a0, ak = coeffs[..., :q0].real, coeffs[..., q0:]
        v = torch.cat([a0, 2 * ak.real, -2 * ak.imag], dim=-1).to(self._synthesis.dtype)
        out = v.new_zeros(v.shape[:-1] + (self.L, self.L))
        out[..., self._mask] = v @ self._synthesis.T
        return out

    def rotate(self, coeffs: torch.Tensor, angle: float | torch.Tensor) -> torch.Tensor:
        """Coefficients of the images rotated by ``angle`` radians (``a_kq -> exp(-i k angle) a_kq``).

        Args:
            coeffs: ``(..., count)`` complex.
            angle: scalar or tensor broadcastable to ``coeffs.shape[:-1]``.
        """
        angle = torch.as_tensor(angle, dtype=coeffs.real.dtype, device=coeffs.device)[..., None]
        return coeffs * torch.polar(torch.ones_like(angle), -angle * self.angular_index.to(angle.dtype))

    # ----------------------------------------------------------------------- radial filters
    def _bins(self) -> torch.Tensor:
        """Radial bin of every Fourier pixel (width ``_BIN_WIDTH`` Fourier pixels), ``(L * L,)``."""
        return torch.round(radial_grid(self.L, 2, dtype=torch.float64) / _BIN_WIDTH).long().flatten()

    @property
    def n_bins(self) -> int:
        """Number of radial bins of :meth:`radial_profile`."""
        return int(self._bins().max()) + 1

    def radial_profile(self, filters: torch.Tensor) -> torch.Tensor:
        """Angular average of centred Fourier filters (e.g. CTFs) in radial bins.

        Bin ``b`` holds the Fourier pixels at distance ``round(rho / 0.5) == b`` from the centre
        (``rho`` in Fourier pixels), up to the corners. Empty bins are 0.

        Args:
            filters: ``(..., L, L)`` real, centred layout.
        Returns:
            ``(..., n_bins)`` float64.
        """
        bins = self._bins().to(filters.device)
        n = self.n_bins
        flat = filters.reshape(-1, self.L * self.L).to(torch.float64)
        sums = flat.new_zeros(flat.shape[0], n).index_add_(1, bins, flat)
        counts = torch.bincount(bins, minlength=n).to(torch.float64).clamp_min(1)
        return (sums / counts).reshape(filters.shape[:-2] + (n,))

    def _fourier_gram_blocks(self) -> list[torch.Tensor]:
        """Per ``k``: ``G_k[b] = Re sum_{xi in bin b} conj(F phi_kq)(xi) (F phi_kq')(xi) / L^2``."""
        if self._fourier_blocks is None:
            bins = self._bins()
            n, L = self.n_bins, self.L
            _, theta = self._polar()
            by_bin = torch.argsort(bins)
            sizes = torch.bincount(bins, minlength=n).tolist()
            blocks = []
            for k, u in enumerate(self._radial):
                phi = torch.zeros(u.shape[0], L, L, dtype=torch.complex128)
                phi[:, self._mask_cpu] = u * torch.exp(1j * k * theta)
                f = fft2c(phi).reshape(u.shape[0], L * L).T[by_bin]  # (L * L, Q), pixels in bin order
                g = torch.stack([(b.conj().T @ b).real for b in torch.split(f, sizes)]) / (L * L)
                blocks.append(g.to(self.device))
            self._fourier_blocks = blocks
        return self._fourier_blocks

    def radial_operator(self, profile: torch.Tensor, k: int) -> torch.Tensor:
        """Matrix of a radial Fourier filter in the block of angular frequency ``k``.

        For a filter ``h`` whose angular average in the bins of :meth:`radial_profile` is
        ``profile``, the coefficients of ``ifft2c(h * fft2c(image))`` are, block by block,
        ``a_k -> H_k a_k`` with ``H_k[q, q'] = <phi_kq, h * phi_kq'>`` (real symmetric). This is the
        exact block-diagonal part of the filter on the grid when ``h`` is constant within each bin;
        for an astigmatic CTF it is the operator of its angular average (the couplings between
        ``k`` and ``k +- 2`` that astigmatism adds are dropped).

        Args:
            profile: ``(..., n_bins)`` from :meth:`radial_profile`.
            k: angular frequency.
        Returns:
            ``(..., Q_k, Q_k)`` float64.
        """
        g = self._fourier_gram_blocks()[k]
        q = g.shape[-1]
        out = profile.to(torch.float64) @ g.reshape(g.shape[0], q * q)
        return out.reshape(profile.shape[:-1] + (q, q))


@functools.lru_cache(maxsize=8)
def _cached_basis(L: int, device: str, dtype: torch.dtype) -> FourierBesselBasis:
    return FourierBesselBasis(L, device=device, dtype=dtype)


def fourier_bessel_basis(
    L: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> FourierBesselBasis:
    """A cached :class:`FourierBesselBasis` (building one takes about a second at ``L = 64``)."""
    return _cached_basis(L, str(torch.device(device) if device is not None else torch.device("cpu")), dtype)
