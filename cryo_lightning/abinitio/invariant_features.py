"""Rotation-invariant features of particle images: steerable coefficients and bispectrum invariants.

Used to find images of similar views whatever their in-plane angle (class averaging,
:mod:`cryo_lightning.abinitio.class_average`; neighbours by
:func:`~cryo_lightning.abinitio.neighbors.nearest_neighbors`). After ASPIRE-Python's
``RIRClass2D`` (Zhao & Singer 2014, JOSA A 31:1):

1. **Steerable coefficients** (:func:`steerable_coefficients`). Images are expanded in the
   Fourier-Bessel basis of :mod:`cryo_lightning.physics.steerable_basis` and, by default, denoised
   by the covariance Wiener filter of :mod:`cryo_lightning.denoise.cwf`, which also corrects the
   CTF: the result estimates each image's *CTF-free* projection. Without denoising, CTF-affected
   images are phase-flipped first.
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

:func:`rotation_invariant_features` runs both steps on a set of images. It is the library's one
rotation-invariant embedding: ``cryol denoise --context neighbours`` groups particles by it too
when the model has no learned embedding of its own.
"""

from __future__ import annotations

import torch

from cryo_lightning.denoise.cwf import cwf_coefficients
from cryo_lightning.physics.ctf import phase_flip
from cryo_lightning.physics.fourier import _crop_or_pad, fourier_resize
from cryo_lightning.physics.noise import estimate_noise_variance
from cryo_lightning.physics.steerable_basis import FourierBesselBasis, fourier_bessel_basis

__all__ = ["steerable_coefficients", "bispectrum_features", "rotation_invariant_features"]


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
    """Rotation-invariant features of steerable coefficients (module docstring, step 2).

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
    max_box: int | None = None,
    basis: FourierBesselBasis | None = None,
) -> torch.Tensor:
    """Rotation-invariant (not shift-invariant) features of a set of images.

    :func:`steerable_coefficients` then :func:`bispectrum_features`; the features depend on the
    whole set (denoising statistics and PCA), so compute them for the set at once.

    Args:
        images: ``(N, L, L)`` real, roughly centred particles.
        ctf, noise_variance, denoise, basis: see :func:`steerable_coefficients` (``basis`` for the
            box after ``max_box``).
        n_features, n_components, n_triples: see :func:`bispectrum_features`.
        max_box: Fourier-crop larger images (and their CTFs, centred) to this box first, keeping
            the field of view. The features rest on the low frequencies, while time and the memory
            of the CTF-aware CWF grow as ``N L^4`` (per-image CTF operators). On simulated
            ``L = 64`` particles at SNR 1/8 and 1/32, cropping to 32 found neighbours as close in
            viewing direction as the full box, to 16 clearly less close. None: no crop.
    Returns:
        ``(N, F)`` unit-norm rows; compare with dot products (cosine similarity).
    """
    L = images.shape[-1]
    if max_box is not None and L > max_box:
        images = fourier_resize(images, max_box, 2)
        ctf = None if ctf is None else _crop_or_pad(ctf, max_box, 2)
        if noise_variance is not None:  # white noise keeps the cropped band's share of its power
            noise_variance = torch.as_tensor(noise_variance) * (max_box / L) ** 2
    basis = _basis_for(images, basis)
    coeffs = steerable_coefficients(images, ctf, noise_variance, denoise=denoise, basis=basis)
    return bispectrum_features(coeffs, basis, n_features=n_features, n_components=n_components,
                               n_triples=n_triples)
