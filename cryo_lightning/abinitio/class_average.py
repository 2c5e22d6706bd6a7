"""Class averaging: rotation-invariant features, nearest neighbours, alignment, CTF-aware averages.

The pipeline follows ASPIRE-Python's ``RIRClass2D`` + ``BFSRAverager2D`` (Zhao & Singer 2014,
JOSA A 31:1; Bhamre, Zhang & Singer 2016):

1. **Steerable coefficients.** Images are expanded in the Fourier-Bessel basis of
   :mod:`cryo_lightning.physics.steerable_basis` and, by default, denoised by the covariance
   Wiener filter of :mod:`cryo_lightning.denoise.cwf`, which also corrects the CTF: the result
   estimates each image's *CTF-free* projection. Without denoising, CTF-affected images are
   phase-flipped first.
2. **Features** (:func:`bispectrum_features`). Per angular frequency ``k`` the coefficients are
   compressed by PCA (steerable PCA; the eigenvectors are shared by the set, so an in-plane
   rotation still multiplies component ``b_k`` by ``exp(-i k alpha)``). The invariants are the
   ``k = 0`` components and bispectrum triples ``b_k1 b_k2 conj(b_{k1+k2})`` (``k1, k2 >= 1``),
   the ``n_triples`` of largest expected magnitude, each compressed to homogeneous degree 1 as
   ``|z|^(1/3) exp(i arg z)`` (ASPIRE's ``alpha = 1/3``); they are centred, reduced by PCA and
   scaled to unit norm. The features are invariant to in-plane rotation (up to the pixel grid's
   departure from exact steerability) but **not to shifts**: particles should be roughly
   centred, and residual shifts are found by the alignment. Mirror images (projections along
   opposite directions) get different features (the bispectrum is conjugated); reflections are
   not searched.
3. **Neighbours** (:func:`nearest_neighbors`): largest cosine similarity of the features.
4. **Alignment.** Without shifts (``max_shift = 0``, the default for centred particles), in the
   steerable basis (:func:`align_coefficients`): rotations act exactly and the correlation over
   all angles is one FFT over ``k``. With shifts (:func:`align`): polar cross-correlation of the
   centre's and each member's spectra (:class:`~cryo_lightning.physics.polar.PolarSpectrum`,
   area-weighted, DC excluded), over all ``n_angles`` rotations at once by FFT along the angle,
   brute force over a square grid of shifts refined on finer local grids, with parabolic
   refinement of the peak. Either way the images aligned are those of step 1 (denoised and
   CTF-free by default).
5. **Averaging** (:func:`aligned_average`). The *original* images are rotated and shifted in
   Fourier space (the 2x zero-padded spectrum is sampled bilinearly on the rotated grid, the
   shift is a phase ramp) and averaged with their CTFs, rotated the same way, as the Wiener
   estimate of the CTF-free centre image::

       A(k) = sum_j H_j(k) F_j(k) / (sum_j H_j(k)^2 + eps(k)),

   ``F_j``, ``H_j`` the aligned spectrum and CTF of member ``j`` (the CTF is real, RELION sign).
   This is the posterior mean under a Gaussian prior when ``eps(k) = L^2 sigma^2 / S(|k|)`` with
   ``S`` the radial power spectrum of the CTF-free projections; by default ``S`` is estimated
   from the set (:func:`~cryo_lightning.denoise.wiener.estimate_radial_spectrum`). ``eps = 0``
   and no CTF give the plain mean of the aligned images. (Chosen over phase-flipped averaging:
   it also restores the CTF's amplitudes, so the average compares with a CTF-free projection.)
   The rotated CTF is interpolated bilinearly on the ``L`` grid: accurate where the CTF varies
   slowly across a pixel, least so near Nyquist at high defocus, where the signal is weakest.

Conventions: angles in radians, counter-clockwise in the ``(x, y)`` frame (``rotate(I, a)(r) =
I(R_{-a} r)``, as ``FourierBesselBasis.rotate``); shifts in pixels, ``(x, y)`` order, as
:func:`~cryo_lightning.physics.projection.translate_spectrum` (``shift(I, t)(r) = I(r - t)``).
An alignment ``(angle, shift)`` of an image to a reference means
``shift(rotate(image, angle), shift) ~ reference``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cryo_lightning.abinitio.peaks import parabolic_offset
from cryo_lightning.denoise.cwf import cwf_coefficients
from cryo_lightning.denoise.wiener import estimate_radial_spectrum
from cryo_lightning.physics.ctf import phase_flip
from cryo_lightning.physics.fourier import frequency_grid, ifft2c, radial_grid
from cryo_lightning.physics.noise import estimate_noise_variance
from cryo_lightning.physics.polar import PolarSpectrum
from cryo_lightning.physics.projection import translate_spectrum
from cryo_lightning.physics.steerable_basis import FourierBesselBasis, fourier_bessel_basis

__all__ = [
    "steerable_coefficients",
    "bispectrum_features",
    "rotation_invariant_features",
    "nearest_neighbors",
    "select_centres",
    "align",
    "align_coefficients",
    "wiener_regularization",
    "aligned_average",
    "ClassAverages",
    "class_averages",
]

# Images used to estimate the radial signal spectrum for the Wiener term (plenty for ~L/2 shells).
_MAX_SPECTRUM_IMAGES = 4096


def _has_ctf(ctf: torch.Tensor | None) -> bool:
    return ctf is not None and not bool((ctf == 1).all())


def _noise_variance(images: torch.Tensor, noise_variance: float | torch.Tensor | None) -> float:
    if noise_variance is None:
        return float(estimate_noise_variance(images).mean())
    return float(torch.as_tensor(noise_variance).mean())


def _basis_for(images: torch.Tensor, basis: FourierBesselBasis | None) -> FourierBesselBasis:
    if basis is not None:
        return basis
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    return fourier_bessel_basis(images.shape[-1], images.device, dtype)


def steerable_coefficients(
    images: torch.Tensor,
    ctf: torch.Tensor | None = None,
    noise_variance: float | torch.Tensor | None = None,
    *,
    denoise: bool = True,
    basis: FourierBesselBasis | None = None,
) -> torch.Tensor:
    """Fourier-Bessel coefficients of the images, CWF-denoised and CTF-corrected by default.

    Args:
        images: ``(N, L, L)`` real, centred particles of one molecule.
        ctf: ``(N, L, L)`` centred CTFs (RELION sign), or None for none.
        noise_variance: per-pixel noise variance (image units squared); None estimates it from
            the pixels outside the inscribed disk.
        denoise: CWF estimate of the CTF-free projections (statistics from the whole set). If
            False, or if the noise variance is 0, the plain coefficients of the images
            (phase-flipped when there is a CTF).
        basis: the :class:`FourierBesselBasis` to use (default: the cached one for ``L``).
    Returns:
        ``(N, count)`` complex coefficients.
    """
    basis = _basis_for(images, basis)
    with_ctf = _has_ctf(ctf)
    s2 = _noise_variance(images, noise_variance)
    if denoise and s2 > 0:
        profiles = basis.radial_profile(ctf)[None] if with_ctf else None
        s2_t = torch.tensor([s2], dtype=torch.float64, device=images.device)
        return cwf_coefficients(basis.expand(images)[None], basis, s2_t, profiles)[0]
    return basis.expand(phase_flip(images, ctf) if with_ctf else images)


def _steerable_pca(
    coeffs: torch.Tensor, basis: FourierBesselBasis, n_components: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-``k`` principal components of the coefficients, the ``n_components`` most energetic.

    Returns:
        ``b (N, M)`` complex components (real for ``k = 0``), their angular frequencies ``(M,)``
        int64 and variances ``(M,)``, sorted by frequency then decreasing variance.
    """
    N = coeffs.shape[0]
    comps, freqs, variances = [], [], []
    for k, a in enumerate(basis.split(coeffs)):
        if k == 0:
            a = a.real
        gram = a.mH @ a / N  # (Q, Q); unchanged when rows are multiplied by phases (rotations)
        evals, evecs = torch.linalg.eigh(gram)
        comps.append(a @ evecs)
        variances.append(evals.real.clamp_min(0))
        freqs.append(torch.full_like(evals.real, k, dtype=torch.int64))
    b = torch.cat([c.to(coeffs.dtype) for c in comps], dim=1)
    var, freq = torch.cat(variances), torch.cat(freqs)
    energy = var * torch.where(freq == 0, 1.0, 2.0).to(var.dtype)  # k >= 1 counts twice (+-k)
    keep = torch.argsort(energy, descending=True)[:n_components]
    keep = keep[var[keep] > 1e-10 * var.max().clamp_min(torch.finfo(var.dtype).tiny)]
    keep = keep[torch.argsort(freq[keep], stable=True)]  # by k, then decreasing energy
    return b[:, keep], freq[keep], var[keep]


def _bispectrum_triples(
    freq: torch.Tensor, var: torch.Tensor, n_triples: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index triples ``(m1, m2, m3)`` with ``k1 + k2 = k3``, ``k1, k2 >= 1``, ``m1 <= m2``, the
    ``n_triples`` of largest ``var1 var2 var3`` (components sorted by ``k`` as from
    :func:`_steerable_pca`)."""
    device = freq.device
    k_max = int(freq.max()) if freq.numel() else 0
    counts = torch.bincount(freq, minlength=k_max + 1)
    starts = torch.cumsum(counts, 0) - counts
    m = torch.nonzero(freq >= 1).flatten()
    i, j = torch.triu_indices(len(m), len(m), device=device)
    m1, m2 = m[i], m[j]
    k3 = freq[m1] + freq[m2]
    ok = k3 <= k_max
    m1, m2, k3 = m1[ok], m2[ok], k3[ok]
    width = int(counts[k3].max()) if len(k3) else 0
    offset = torch.arange(width, device=device)
    m3 = starts[k3, None] + offset  # (P, width) candidates of frequency k3
    valid = offset < counts[k3, None]
    m1, m2 = m1[:, None].expand_as(m3)[valid], m2[:, None].expand_as(m3)[valid]
    m3 = m3[valid]
    log_var = torch.log(var.to(torch.float64).clamp_min(1e-300))
    weight = log_var[m1] + log_var[m2] + log_var[m3]
    top = torch.topk(weight, min(n_triples, len(weight))).indices
    return m1[top], m2[top], m3[top]


def bispectrum_features(
    coeffs: torch.Tensor,
    basis: FourierBesselBasis,
    *,
    n_features: int = 200,
    n_components: int = 256,
    n_triples: int = 1000,
    chunk: int = 4096,
) -> torch.Tensor:
    """Rotation-invariant features of steerable coefficients (see the module docstring, step 2).

    Args:
        coeffs: ``(N, count)`` complex coefficients in ``basis`` (e.g. :func:`steerable_coefficients`).
        basis: their :class:`FourierBesselBasis`.
        n_features: output dimension (PCA of the centred raw invariants).
        n_components: steerable principal components kept over all ``k``.
        n_triples: bispectrum triples used.
        chunk: images per pass when building the invariants (memory).
    Returns:
        ``(N, F)`` float32 (float64 for float64 bases), unit rows, ``F <= n_features``.
    """
    N = coeffs.shape[0]
    b, freq, var = _steerable_pca(coeffs, basis, n_components)
    m1, m2, m3 = _bispectrum_triples(freq, var, n_triples)
    linear = freq == 0

    def raw(rows: slice) -> torch.Tensor:
        x = b[rows]
        z = x[:, m1] * x[:, m2] * x[:, m3].conj()
        mag = z.abs()
        z = z * torch.where(mag > 0, mag.clamp_min(1e-300).pow(-2.0 / 3.0), torch.zeros_like(mag))
        return torch.cat([x[:, linear].real, z.real, z.imag], dim=1).to(torch.float64)

    pieces = [slice(s, min(s + chunk, N)) for s in range(0, N, chunk)]
    X = torch.cat([raw(p) for p in pieces])
    X = X - X.mean(0)
    n = min(n_features, *X.shape)
    if X.shape[0] >= X.shape[1]:
        _, V = torch.linalg.eigh(X.T @ X)
        feats = X @ V[:, -n:]
    else:  # fewer images than invariants: the same projections X V = U S from the smaller Gram
        evals, U = torch.linalg.eigh(X @ X.T)
        feats = U[:, -n:] * evals[-n:].clamp_min(0).sqrt()
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return feats.to(basis.dtype)


def rotation_invariant_features(
    images: torch.Tensor,
    ctf: torch.Tensor | None = None,
    noise_variance: float | torch.Tensor | None = None,
    *,
    denoise: bool = True,
    n_features: int = 200,
    n_components: int = 256,
    n_triples: int = 1000,
    basis: FourierBesselBasis | None = None,
) -> torch.Tensor:
    """Rotation-invariant (not shift-invariant) features of a set of images.

    :func:`steerable_coefficients` then :func:`bispectrum_features`; the features depend on the
    whole set (denoising statistics and PCA), so compute them for the set at once.

    Args:
        images: ``(N, L, L)`` real, roughly centred particles.
        ctf, noise_variance, denoise, basis: see :func:`steerable_coefficients`.
        n_features, n_components, n_triples: see :func:`bispectrum_features`.
    Returns:
        ``(N, F)`` unit-norm rows; compare with dot products (cosine similarity).
    """
    basis = _basis_for(images, basis)
    coeffs = steerable_coefficients(images, ctf, noise_variance, denoise=denoise, basis=basis)
    return bispectrum_features(coeffs, basis, n_features=n_features, n_components=n_components,
                               n_triples=n_triples)


def nearest_neighbors(
    features: torch.Tensor, k: int, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar images of each image by cosine similarity, itself first.

    Args:
        features: ``(N, F)``.
        k: neighbours per image, including itself (``k <= N``).
        chunk: rows of the similarity matrix per pass (memory ``chunk * N``).
    Returns:
        ``(indices, similarities)``: ``(N, k)`` int64 (column 0 is the image itself) and
        ``(N, k)`` cosine similarities, decreasing along each row after the first column.
    """
    N = features.shape[0]
    if not 1 <= k <= N:
        raise ValueError(f"k must be in [1, {N}], got {k}")
    f = features / features.norm(dim=1, keepdim=True).clamp_min(torch.finfo(features.dtype).tiny)
    indices, sims = [], []
    for s in range(0, N, chunk):
        rows = torch.arange(s, min(s + chunk, N), device=f.device)
        sim = f[rows] @ f.T
        self_sim = sim[torch.arange(len(rows)), rows].clone()
        sim[torch.arange(len(rows)), rows] = math.inf  # self first, even among exact duplicates
        val, idx = torch.topk(sim, k, dim=1)
        val[:, 0] = self_sim
        indices.append(idx)
        sims.append(val)
    return torch.cat(indices), torch.cat(sims)


def select_centres(neighbors: torch.Tensor, similarities: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy choice of ``n`` class centres whose classes overlap little.

    Images are visited by decreasing mean similarity to their neighbours (tight classes first);
    an image becomes a centre unless it already belongs to a chosen class. If that yields fewer
    than ``n`` centres, the remaining images are taken in the same order.

    Args:
        neighbors, similarities: ``(N, k)`` from :func:`nearest_neighbors`.
        n: number of centres (``<= N``).
    Returns:
        ``(n,)`` int64 image indices.
    """
    N = neighbors.shape[0]
    n = min(n, N)
    order = torch.argsort(similarities[:, 1:].mean(1) if similarities.shape[1] > 1 else similarities[:, 0],
                          descending=True).tolist()
    members = neighbors.tolist()
    covered = [False] * N
    chosen, skipped = [], []
    for i in order:
        if len(chosen) == n:
            break
        if covered[i]:
            skipped.append(i)
            continue
        chosen.append(i)
        for j in members[i]:
            covered[j] = True
    chosen += skipped[: n - len(chosen)]
    return torch.tensor(chosen, dtype=torch.int64, device=neighbors.device)


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


def wiener_regularization(
    images: torch.Tensor, ctf: torch.Tensor | None = None, noise_variance: float | torch.Tensor | None = None
) -> torch.Tensor:
    """The Wiener term ``eps(k) = L^2 sigma^2 / S(|k|)`` of :func:`aligned_average`.

    ``S`` is the radial power spectrum of the CTF-free projections, fitted on (at most 4096
    evenly spaced) images by :func:`~cryo_lightning.denoise.wiener.estimate_radial_spectrum`;
    where it is 0 (pure noise), ``eps`` is infinite and the average there is 0.

    Args:
        images: ``(N, L, L)`` noisy images.
        ctf: ``(N, L, L)`` centred CTFs or None.
        noise_variance: per-pixel noise variance, or None to estimate it from the background.
    Returns:
        ``(L, L)`` centred, in units of ``|DFT|^2`` (``sum_j H_j^2`` is dimensionless).
    """
    N, L = images.shape[0], images.shape[-1]
    s2 = _noise_variance(images, noise_variance)
    pick = torch.linspace(0, N - 1, min(N, _MAX_SPECTRUM_IMAGES), device=images.device).round().long()
    x = images[pick]
    h = ctf[pick] if ctf is not None else torch.ones_like(x)
    spectrum = estimate_radial_spectrum(x[None], h[None], s2)[0]
    shells = torch.round(radial_grid(L, 2, device=images.device)).long()
    S = spectrum[shells]
    return (L * L * s2) / S.clamp_min(torch.finfo(S.dtype).tiny)


def _padded_spectrum(images: torch.Tensor) -> torch.Tensor:
    """``fft2c`` of the images zero-padded to ``2L`` (centre ``L // 2`` -> ``L``): ``(M, 2L, 2L)``.

    Written without ``fftshift`` (whose rolls cost more than the FFT): the image is placed
    directly in the wrapped layout of ``ifftshift``, and the output shift by ``L`` becomes the
    input modulation ``(-1)^(i + j)``.
    """
    M, L = images.shape[0], images.shape[-1]
    c = L // 2
    # Pixel i lands at index i - c (mod 2L), of the same parity as i - c: modulate before placing.
    n = torch.arange(L, device=images.device) - c
    x = images * (1 - 2 * ((n[:, None] + n[None, :]) % 2)).to(images.dtype)
    y = images.new_zeros(M, 2 * L, 2 * L)
    y[:, : L - c, : L - c] = x[:, c:, c:]
    if c > 0:
        y[:, : L - c, -c:] = x[:, c:, :c]
        y[:, -c:, : L - c] = x[:, :c, c:]
        y[:, -c:, -c:] = x[:, :c, :c]
    return torch.fft.fft2(y)


def _aligned_spectra(
    images: torch.Tensor, angles: torch.Tensor, ctf: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Centred spectra ``F(R_{-a} k)`` of ``(M, L, L)`` images rotated by ``angles (M,)``, and their
    CTFs ``H(R_{-a} k)`` (bilinear on the ``L`` grid) when given."""
    L = images.shape[-1]
    spec = torch.view_as_real(_padded_spectrum(images)).permute(0, 3, 1, 2)  # (M, 2, 2L, 2L)
    ky, kx = frequency_grid(L, 2, device=images.device, dtype=images.dtype)
    c, s = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
    q = torch.stack([kx * c + ky * s, -kx * s + ky * c], dim=-1)  # R_{-a} k as (x, y), (M, L, L, 2)
    Lp = 2 * L
    grid = (q * Lp + Lp // 2) * 2 / (Lp - 1) - 1
    out = F.grid_sample(spec, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    rotated = torch.complex(out[:, 0], out[:, 1])
    if ctf is None:
        return rotated, None
    grid_l = (q * L + L // 2) * 2 / (L - 1) - 1
    h = F.grid_sample(ctf[:, None].to(images.dtype), grid_l, mode="bilinear", padding_mode="border",
                      align_corners=True)
    return rotated, h[:, 0]


def aligned_average(
    images: torch.Tensor,
    angles: torch.Tensor,
    shifts: torch.Tensor,
    ctf: torch.Tensor | None = None,
    eps: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """CTF-aware average of aligned images: ``sum_j H_j F_j / (sum_j H_j^2 + eps)`` in Fourier space.

    Args:
        images: ``(..., k, L, L)`` real images of each class.
        angles: ``(..., k)`` radians, shifts ``(..., k, 2)`` pixels ``(x, y)``, from :func:`align`:
            image ``j`` contributes ``shift(rotate(image_j, angle_j), shift_j)``.
        ctf: ``(..., k, L, L)`` centred CTFs (RELION sign) or None (all ones).
        eps: scalar or ``(L, L)`` centred Wiener term (:func:`wiener_regularization`); 0 with no
            CTF gives the plain mean.
    Returns:
        ``(..., L, L)`` estimates of the CTF-free image in the reference's frame.
    """
    L, k = images.shape[-1], images.shape[-3]
    lead = images.shape[:-3]
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.reshape(-1, L, L).to(dtype)
    h_in = None if ctf is None else ctf.reshape(-1, L, L)
    spec, h = _aligned_spectra(x, angles.reshape(-1).to(dtype), h_in)
    if bool(shifts.any()):
        spec = translate_spectrum(spec, shifts.reshape(-1, 2).to(dtype))
    if h is None:
        h = torch.ones_like(spec.real)
    num = (h * spec).reshape(-1, k, L, L).sum(1)
    den = h.square().reshape(-1, k, L, L).sum(1) + torch.as_tensor(eps, dtype=dtype, device=x.device)
    avg = ifft2c(num / den.clamp_min(torch.finfo(dtype).tiny)).real
    return avg.reshape(*lead, L, L).to(images.dtype)


@dataclass
class ClassAverages:
    """Result of :func:`class_averages`.

    Attributes:
        averages: ``(C, L, L)`` CTF-corrected class averages, each in its centre image's frame.
        centres: ``(C,)`` int64 index of each class's centre image.
        members: ``(C, k)`` int64 image indices, the centre first.
        angles: ``(C, k)`` radians, shifts ``(C, k, 2)`` pixels ``(x, y)``: member ``j`` aligned as
            ``shift(rotate(image, angle), shift)`` matches the centre.
        scores: ``(C, k)`` normalised alignment correlations.
        similarities: ``(C, k)`` feature cosine similarities of the members to the centre.
    """

    averages: torch.Tensor
    centres: torch.Tensor
    members: torch.Tensor
    angles: torch.Tensor
    shifts: torch.Tensor
    scores: torch.Tensor
    similarities: torch.Tensor


@torch.no_grad()
def class_averages(
    images: torch.Tensor,
    ctf: torch.Tensor | None = None,
    noise_variance: float | torch.Tensor | None = None,
    *,
    n_neighbors: int = 10,
    centres: int | torch.Tensor | None = None,
    denoise: bool = True,
    n_features: int = 200,
    n_angles: int = 360,
    max_shift: float = 0.0,
    shift_step: float = 1.0,
    max_radius: float = 0.4,
    eps: float | torch.Tensor | None = None,
    chunk: int = 64,
    basis: FourierBesselBasis | None = None,
) -> ClassAverages:
    """Class averages of a set of particle images of one molecule (module docstring, steps 1-5).

    Args:
        images: ``(N, L, L)`` real, roughly centred particles.
        ctf: ``(N, L, L)`` centred CTFs (RELION sign), or None.
        noise_variance: per-pixel noise variance; None estimates it from the background.
        n_neighbors: class size ``k``, the centre included.
        centres: None (a class for every image), an int (that many centres from
            :func:`select_centres`) or ``(C,)`` image indices.
        denoise: classify and align the CWF-denoised CTF-free images (else the images themselves,
            phase-flipped when there is a CTF). Averages always use the original images.
        n_features: feature dimension (:func:`bispectrum_features`).
        n_angles, max_shift, shift_step, max_radius: alignment search (:func:`align`, or
            :func:`align_coefficients` when ``max_shift`` is 0).
        eps: Wiener term of the average; None estimates it (:func:`wiener_regularization`).
        chunk: classes aligned and averaged per pass (memory ~ ``chunk * k * (2L)^2`` complex
            values; :func:`align` bounds its own intermediates).
        basis: :class:`FourierBesselBasis` for ``L`` (default: the cached one).
    Returns:
        :class:`ClassAverages`.
    """
    N = images.shape[0]
    basis = _basis_for(images, basis)
    with_ctf = _has_ctf(ctf)
    coeffs = steerable_coefficients(images, ctf, noise_variance, denoise=denoise, basis=basis)
    feats = bispectrum_features(coeffs, basis, n_features=n_features)
    neighbors, sims = nearest_neighbors(feats, n_neighbors)
    if centres is None:
        centre_idx = torch.arange(N, device=images.device)
    elif isinstance(centres, int):
        centre_idx = select_centres(neighbors, sims, centres)
    else:
        centre_idx = torch.as_tensor(centres, dtype=torch.int64, device=images.device)
    members = neighbors[centre_idx]
    if eps is None:
        eps = wiener_regularization(images, ctf if with_ctf else None, noise_variance)

    def alignment_source(idx: torch.Tensor) -> torch.Tensor:
        # The denoised coefficients are CTF-free; the plain ones were phase-flipped.
        return basis.evaluate(coeffs[idx].to(torch.complex128 if basis.dtype == torch.float64 else torch.complex64))

    out = {"averages": [], "angles": [], "shifts": [], "scores": []}
    for s in range(0, len(centre_idx), chunk):
        c_idx, m_idx = centre_idx[s : s + chunk], members[s : s + chunk]
        if max_shift > 0:
            angles, shifts, scores = align(
                alignment_source(c_idx), alignment_source(m_idx), n_angles=n_angles, max_shift=max_shift,
                shift_step=shift_step, max_radius=max_radius,
            )
        else:
            angles, scores = align_coefficients(coeffs[c_idx], coeffs[m_idx], basis, n_angles=n_angles,
                                                max_radius=max_radius)
            shifts = angles.new_zeros(angles.shape + (2,))
        avg = aligned_average(images[m_idx], angles, shifts, ctf[m_idx] if with_ctf else None, eps)
        for key, value in zip(out, (avg, angles, shifts, scores)):
            out[key].append(value.to(images.dtype))
    cat = {key: torch.cat(v) for key, v in out.items()}
    return ClassAverages(
        averages=cat["averages"], centres=centre_idx, members=members, angles=cat["angles"],
        shifts=cat["shifts"], scores=cat["scores"], similarities=sims[centre_idx],
    )
