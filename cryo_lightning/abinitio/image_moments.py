"""First and second moments of particle images in a steerable basis, streamed and noise-debiased.

Images are represented by their 2D Fourier-Bessel coefficients
(:class:`~cryo_lightning.physics.steerable_basis.FourierBesselBasis`), truncated to angular
frequencies ``k <= k_max`` and radial functions below a band limit (:class:`MomentLayout`). For
poses whose in-plane angle is uniform, averaging over that angle makes the moments
block-diagonal in ``k`` (an in-plane rotation multiplies block ``k`` by ``exp(-i k alpha)``), so
the compressed representation kept here is::

    M1     = E[c]                      (all kept k; the k != 0 entries vanish up to the grid's
                                        non-steerability, and are kept so that the forward model
                                        can be compared entry by entry)
    M2_k   = E[c_k c_k^H] - sigma^2 I  (one Hermitian Q_k x Q_k block per k)

and, optionally, the slice of the third moment with one index in the rotation-invariant block
``k = 0`` (``Q_0`` radial coefficients ``c_0t``)::

    M3_k[t] = E[c_0t c_k c_k^H] - sigma^2 (m_0t I + [k = 0] (e_t m_0^T + m_0 e_t^T))

(``m = E[c]``; ``c_0`` is real for real images, the noise's odd moments vanish and its ``k = 0``
block is real with covariance ``sigma^2 I``, which gives the three bias terms). A rotation
multiplies block ``k`` by ``exp(-i k alpha)`` and leaves ``c_0`` alone, so this slice is
in-plane invariant like ``M2`` and costs ``Q_0`` times its memory. ``M1`` and ``M2`` of in-plane
uniform projections leave many directions of the volume nearly undetermined (measured in
benchmarks/moments.py); this slice pins them down.

per CTF group. The noise term is exactly ``sigma^2 I`` in every block: noise is white in pixels
(added after the CTF), and the radial functions of each ``k`` are orthonormal on the pixel grid,
so ``E[n_k n_k^H] = sigma^2 Phi_k^H Phi_k = sigma^2 I`` (``H H^T`` of the noise model ``I = H P
+ n`` is the identity here because ``H`` acts on the signal only).

CTF groups: the estimator accumulates sums per group (memory independent of the number of
images); :func:`group_by_defocus` bins images by mean defocus and returns one representative,
astigmatism-free CTF per group. The forward model
(:class:`~cryo_lightning.abinitio.moment_forward_model.MomentModel`) is then evaluated with those CTFs;
astigmatism and the spread of defocus within a bin are the approximations (a group's
representative CTF is exact when all its images share it).

Everything is pure torch, accumulates in float64/complex128 on the layout's device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from cryo_lightning.physics.ctf import CTFParams
from cryo_lightning.physics.steerable_basis import FourierBesselBasis

__all__ = ["MomentLayout", "ImageMoments", "MomentEstimator", "estimate_moments", "defocus_bins", "group_by_defocus",
           "moment_discrepancy"]


class MomentLayout:
    """Truncated steerable image basis in which moments are formed.

    Keeps the Fourier-Bessel functions ``phi_kq`` with ``k <= k_max`` and ``z_kq < 2 pi c R``
    (``R = L / 2``), i.e. radial frequency below the band limit ``c`` (cycles/pixel). Projections
    of a volume expanded in spherical harmonics of degree ``<= l_max`` have angular frequencies
    ``<= l_max``, so ``k_max = l_max`` keeps all their content up to the grid's
    non-steerability.

    Args:
        L: image size (pixels).
        k_max: highest angular frequency kept.
        bandlimit: ``c`` in cycles/pixel (default Nyquist, 0.5).
        device: where the basis lives.

    Attributes:
        basis: the full :class:`FourierBesselBasis` (float64).
        block_sizes: ``Q_k`` kept for ``k = 0..k_max``.
        count: ``sum_k Q_k`` (complex coefficients).
        index: ``(count,)`` positions of the kept coefficients in the full basis.
        angular_index: ``(count,)`` ``k`` of each kept coefficient.
    """

    def __init__(self, L: int, k_max: int, bandlimit: float = 0.5, device: torch.device | str | None = None) -> None:
        if not 0 < bandlimit <= 0.5:
            raise ValueError(f"bandlimit must be in (0, 0.5] cycles/pixel, got {bandlimit}")
        self.L, self.k_max, self.bandlimit = L, int(k_max), float(bandlimit)
        self.basis = FourierBesselBasis(L, device=device, dtype=torch.float64)
        self.device = self.basis.device
        cutoff = 2 * math.pi * self.bandlimit * self.basis.radius
        offsets = [0]
        for q in self.basis.block_sizes:
            offsets.append(offsets[-1] + q)
        sizes, index = [], []
        for k in range(self.k_max + 1):
            n = int((self.basis.zeros[k] < cutoff).sum()) if k < len(self.basis.zeros) else 0
            sizes.append(n)
            index.append(torch.arange(offsets[k], offsets[k] + n) if n else torch.zeros(0, dtype=torch.int64))
        self.block_sizes: list[int] = sizes
        self.count = sum(sizes)
        self.index = torch.cat(index).to(self.device)
        self.angular_index = torch.cat([torch.full((q,), k, dtype=torch.int64) for k, q in enumerate(sizes)]).to(
            self.device
        )

    def expand(self, images: torch.Tensor) -> torch.Tensor:
        """Kept coefficients of real images.

        Args:
            images: ``(..., L, L)`` real, centre at ``L // 2``.
        Returns:
            ``(..., count)`` complex128.
        """
        return self.basis.expand(images.to(self.device, torch.float64))[..., self.index]

    def split(self, coeffs: torch.Tensor) -> list[torch.Tensor]:
        """Per-``k`` blocks ``(..., Q_k)`` of ``(..., count)`` coefficients."""
        return list(torch.split(coeffs, self.block_sizes, dim=-1))


@dataclass
class ImageMoments:
    """Moments of a set of images, per CTF group (module docstring).

    Attributes:
        m1: ``(G, count)`` complex128, mean coefficients.
        m2: per ``k``, ``(G, Q_k, Q_k)`` complex128 Hermitian, debiased second moment.
        counts: ``(G,)`` float64, images per group.
        noise_variance: ``(G,)`` float64, the mean ``sigma^2`` subtracted (0 if not debiased).
        m3: per ``k``, ``(G, Q_0, Q_k, Q_k)`` complex128, the debiased third-moment slice
            ``M3_k[t]`` (``None`` if not estimated).
        m1_error, m2_error, m3_error: sampling error of the estimates: the expected squared norm
            ``E ||M_hat - M||^2`` of ``M1`` ``(G,)``, of each ``M2_k`` ``(G, K)`` and of each
            ``M3_k`` ``(G, K)``, estimated from the same images (the variance of a mean is the
            per-image variance over ``n``); ``None`` for exact moments.
    """

    m1: torch.Tensor
    m2: list[torch.Tensor]
    counts: torch.Tensor
    noise_variance: torch.Tensor
    m3: list[torch.Tensor] | None = None
    m1_error: torch.Tensor | None = None
    m2_error: torch.Tensor | None = None
    m3_error: torch.Tensor | None = None

    @property
    def weights(self) -> torch.Tensor:
        """``(G,)`` fraction of images in each group."""
        return self.counts / self.counts.sum()

    def _map(self, fn) -> ImageMoments:
        def one(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return ImageMoments(fn(self.m1), [fn(b) for b in self.m2], fn(self.counts), fn(self.noise_variance),
                            None if self.m3 is None else [fn(b) for b in self.m3],
                            one(self.m1_error), one(self.m2_error), one(self.m3_error))

    def to(self, device: torch.device | str) -> ImageMoments:
        return self._map(lambda t: t.to(device))

    def detach(self) -> ImageMoments:
        """The same moments cut from the autograd graph (e.g. of denoised images)."""
        return self._map(torch.Tensor.detach)


def squared_norm(x: torch.Tensor) -> torch.Tensor:
    """``(G, ...)`` real or complex -> ``(G,)``: ``sum |x|^2`` over every axis but the first (per group)."""
    return (x.real * x.real + x.imag * x.imag).sum(dim=tuple(range(1, x.ndim)))


def moment_discrepancy(estimate: ImageMoments, reference: ImageMoments, third: bool = False) -> torch.Tensor:
    """Relative difference of two sets of moments of the same groups, ``sum_j ||E_j - R_j||^2 / ||R_j||^2``.

    One term per moment order ``j`` (``M1``; ``M2`` over all blocks ``k``; the ``M3`` slice with
    ``third``), each group weighted by the reference's image fraction. It is what a denoiser that
    neither shrinks nor invents signal keeps near the reference's sampling error: the moments of
    denoised images against the noise-debiased moments of the same raw images.

    Returns:
        scalar float64, differentiable in both arguments.
    """
    w = reference.weights

    def term(est: list[torch.Tensor], ref: list[torch.Tensor]) -> torch.Tensor:
        num = sum((w * squared_norm(e - r)).sum() for e, r in zip(est, ref))
        den = sum((w * squared_norm(r)).sum() for r in ref)
        return num / den.clamp_min(1e-300)

    total = term([estimate.m1], [reference.m1]) + term(estimate.m2, reference.m2)
    if third:
        if estimate.m3 is None or reference.m3 is None:
            raise ValueError("third=True needs both sets of moments with m3")
        total = total + term(estimate.m3, reference.m3)
    return total


class MomentEstimator:
    """Streaming estimator of :class:`ImageMoments`; memory ``O(G sum_k Q_k^2)`` (times ``Q_0``
    with the third moment), independent of ``N``.

    Example::

        est = MomentEstimator(layout, n_groups=4)
        for images, groups, sigma2 in loader:
            est.update(images, groups, sigma2)
        moments = est.result()

    Args:
        layout: the image basis.
        n_groups: number of CTF groups ``G``.
        third: also accumulate the third-moment slice ``M3_k[t]``.
    """

    def __init__(self, layout: MomentLayout, n_groups: int = 1, third: bool = False) -> None:
        self.layout, self.n_groups = layout, int(n_groups)
        dev, G = layout.device, self.n_groups
        self._s1 = torch.zeros(G, layout.count, dtype=torch.complex128, device=dev)
        self._s2 = [torch.zeros(G, q, q, dtype=torch.complex128, device=dev) for q in layout.block_sizes]
        q0 = layout.block_sizes[0]
        self._s3 = [torch.zeros(G, q0, q, q, dtype=torch.complex128, device=dev) for q in layout.block_sizes] if third else None
        # sums of |c_k|^4 and |c_0|^2 |c_k|^4 per group and block: the squared norms of the
        # per-image terms of M2_k and M3_k, from which the estimates' sampling errors follow
        K = len(layout.block_sizes)
        self._q2 = torch.zeros(G, K, dtype=torch.float64, device=dev)
        self._q3 = torch.zeros(G, K, dtype=torch.float64, device=dev)
        self._n = torch.zeros(G, dtype=torch.float64, device=dev)
        self._noise = torch.zeros(G, dtype=torch.float64, device=dev)

    def update(
        self,
        images: torch.Tensor,
        groups: torch.Tensor | None = None,
        noise_variance: float | torch.Tensor | None = None,
    ) -> None:
        """Add images to the running sums.

        Args:
            images: ``(n, L, L)`` real (any device; moved to the layout's).
            groups: ``(n,)`` int64 CTF group of each image in ``[0, G)`` (all 0 when ``None``).
            noise_variance: ``sigma^2`` per image (scalar or ``(n,)``), pixel units; accumulated so
                that :meth:`result` subtracts each group's mean. ``None`` adds 0.
        """
        dev = self.layout.device
        c = self.layout.expand(images)  # (n, count)
        n = c.shape[0]
        g = torch.zeros(n, dtype=torch.int64, device=dev) if groups is None else groups.to(dev, torch.int64)
        if n and (int(g.min()) < 0 or int(g.max()) >= self.n_groups):
            raise ValueError(f"group indices must be in [0, {self.n_groups}), got [{int(g.min())}, {int(g.max())}]")
        onehot = torch.nn.functional.one_hot(g, self.n_groups).to(torch.float64)  # (n, G)
        self._n += onehot.sum(0)
        self._s1 += onehot.to(c.dtype).T @ c
        blocks = self.layout.split(c)
        power = torch.stack([ck.real.square().sum(-1) + ck.imag.square().sum(-1) for ck in blocks], dim=-1)  # (n, K)
        self._q2 += onehot.T @ power.square()
        self._q3 += onehot.T @ (power[:, :1] * power.square())
        for s2, ck in zip(self._s2, blocks):
            # sum over images of c c^H, per group: (G, n) x (n, Q) x (n, Q)
            s2 += torch.einsum("ng,nq,nr->gqr", onehot.to(c.dtype), ck, ck.conj())
        if self._s3 is not None:
            weighted = onehot.to(c.dtype)[:, :, None] * c[:, None, : self.layout.block_sizes[0]]  # (n, G, Q0)
            for s3, ck in zip(self._s3, self.layout.split(c)):
                outer = (ck[:, :, None] * ck[:, None, :].conj()).flatten(1)  # (n, Q*Q)
                s3 += torch.einsum("ngt,nx->gtx", weighted, outer).view(s3.shape)
        if noise_variance is not None:
            s = torch.as_tensor(noise_variance, dtype=torch.float64, device=dev).expand(n)
            self._noise += onehot.T @ s

    def result(self, noise_variance: float | None = None) -> ImageMoments:
        """Mean moments per group, with ``sigma^2 I`` subtracted from each ``M2_k``.

        Args:
            noise_variance: if given, overrides the per-image values passed to :meth:`update`.
        Raises:
            ValueError: a group received no image.
        """
        if bool((self._n == 0).any()):
            empty = torch.nonzero(self._n == 0).flatten().tolist()
            raise ValueError(f"CTF groups {empty} received no image")
        n = self._n
        sigma2 = (
            torch.full_like(n, float(noise_variance)) if noise_variance is not None else self._noise / n
        )
        m1 = self._s1 / n[:, None]
        m2 = []
        for s2 in self._s2:
            eye = torch.eye(s2.shape[-1], dtype=s2.dtype, device=s2.device)
            m2.append(s2 / n[:, None, None] - sigma2[:, None, None] * eye)
        m3 = None
        if self._s3 is not None:
            m3 = []
            m0 = self.layout.split(m1)[0]  # (G, Q0)
            for k, s3 in enumerate(self._s3):
                eye = torch.eye(s3.shape[-1], dtype=s3.dtype, device=s3.device)
                bias = m0[:, :, None, None] * eye  # (G, Q0, Q, Q)
                if k == 0:
                    e = torch.eye(m0.shape[-1], dtype=s3.dtype, device=s3.device)  # e[t, i] = delta_ti
                    bias = bias + e[None, :, :, None] * m0[:, None, None, :] + m0[:, None, :, None] * e[None, :, None, :]
                m3.append(s3 / n[:, None, None, None] - sigma2[:, None, None, None] * bias)
        # sampling errors: E||mean - E||^2 = (E||x||^2 - ||E x||^2) / n for x = c, c_k c_k^H, c_0t c_k c_k^H
        raw2 = [s2 / n[:, None, None] for s2 in self._s2]
        second = sum(torch.diagonal(r, dim1=-2, dim2=-1).real.sum(-1) for r in raw2)  # E||c||^2
        m1_error = (second - squared_norm(m1)).clamp_min(0) / n
        m2_error = (self._q2 / n[:, None] - torch.stack([squared_norm(r) for r in raw2], -1)).clamp_min(0) / n[:, None]
        m3_error = None
        if self._s3 is not None:
            raw3 = torch.stack([squared_norm(s3 / n[:, None, None, None]) for s3 in self._s3], -1)
            m3_error = (self._q3 / n[:, None] - raw3).clamp_min(0) / n[:, None]
        return ImageMoments(m1, m2, n.clone(), sigma2, m3, m1_error, m2_error, m3_error)


def estimate_moments(
    images: torch.Tensor | Iterable[torch.Tensor],
    layout: MomentLayout,
    groups: torch.Tensor | None = None,
    noise_variance: float | torch.Tensor | None = None,
    n_groups: int = 1,
    batch_size: int = 2048,
    third: bool = False,
) -> ImageMoments:
    """Moments of a stack of images (streamed in batches), noise-debiased.

    Args:
        images: ``(N, L, L)`` tensor (any device), or an iterable of ``(n, L, L)`` batches (then
            ``groups`` and a per-image ``noise_variance`` are not supported: use
            :class:`MomentEstimator`).
        layout: image basis.
        groups: ``(N,)`` CTF group per image (see :func:`group_by_defocus`).
        noise_variance: ``sigma^2``, scalar or ``(N,)``.
        n_groups: ``G`` (default ``groups.max() + 1``).
        batch_size: images per batch.
        third: also estimate the third-moment slice.
    """
    if groups is not None:
        n_groups = max(n_groups, int(groups.max()) + 1)
    est = MomentEstimator(layout, n_groups, third=third)
    if isinstance(images, torch.Tensor):
        per_image = isinstance(noise_variance, torch.Tensor) and noise_variance.ndim > 0
        for s in range(0, images.shape[0], batch_size):
            sl = slice(s, s + batch_size)
            est.update(images[sl], None if groups is None else groups[sl],
                       noise_variance[sl] if per_image else noise_variance)
    else:
        if groups is not None or (isinstance(noise_variance, torch.Tensor) and noise_variance.ndim > 0):
            raise ValueError("per-image groups/noise need a tensor of images; use MomentEstimator for streams")
        for batch in images:
            est.update(batch, None, noise_variance)
    return est.result()


def defocus_bins(mean_defocus: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Equal-count quantile bins of ``(N,)`` mean defocus: ``(N,)`` int64 group in ``[0, n_groups)``."""
    n = mean_defocus.shape[0]
    groups = torch.empty(n, dtype=torch.int64, device=mean_defocus.device)
    groups[torch.argsort(mean_defocus)] = torch.arange(n, device=mean_defocus.device) * n_groups // n
    return groups


def group_by_defocus(params: CTFParams, n_groups: int) -> tuple[torch.Tensor, CTFParams]:
    """Bin images into CTF groups by mean defocus (equal-count quantile bins).

    Args:
        params: per-image CTF parameters, batch shape ``(N,)``.
        n_groups: ``G`` (at most ``N``).
    Returns:
        ``groups (N,)`` int64 and representative parameters with batch shape ``(G,)``: the
        group's mean of ``(defocus_u + defocus_v) / 2`` without astigmatism, other fields
        averaged.
    """
    mean_defocus = 0.5 * (params.defocus_u + params.defocus_v)
    n = mean_defocus.shape[0]
    n_groups = max(1, min(int(n_groups), n))
    groups = defocus_bins(mean_defocus, n_groups)
    onehot = torch.nn.functional.one_hot(groups, n_groups).to(mean_defocus.dtype)
    count = onehot.sum(0)

    def mean(t: torch.Tensor) -> torch.Tensor:
        return (onehot.T @ t.to(onehot.dtype).expand(n)) / count

    fields = {f: mean(getattr(params, f)) for f in CTFParams.fields()}
    d = mean(mean_defocus)
    fields.update(defocus_u=d, defocus_v=d, defocus_angle=torch.zeros_like(d))
    return groups, CTFParams(**fields)
