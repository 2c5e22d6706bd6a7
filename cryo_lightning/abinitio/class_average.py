"""Class averages: each image averaged with its nearest neighbours in a rotation-invariant
feature space, after aligning them to it, with CTF correction.

The pipeline follows ASPIRE-Python's ``RIRClass2D`` + ``BFSRAverager2D`` (Zhao & Singer 2014,
JOSA A 31:1; Bhamre, Zhang & Singer 2016); each step is described in its module:

1. **Steerable coefficients**, CWF-denoised and CTF-corrected by default
   (:func:`~cryo_lightning.abinitio.invariant_features.steerable_coefficients`).
2. **Features**: bispectrum invariants of the steerable principal components
   (:func:`~cryo_lightning.abinitio.invariant_features.bispectrum_features`).
3. **Neighbours**: largest cosine similarity of the features
   (:func:`~cryo_lightning.abinitio.neighbors.nearest_neighbors`). The class centres are every
   image, given images, or a greedy choice of classes that overlap little
   (:func:`~cryo_lightning.abinitio.neighbors.select_centres`).
4. **Alignment** of each class's members to its centre
   (:mod:`cryo_lightning.abinitio.image_alignment`): without shifts (``max_shift = 0``, the
   default for centred particles) in the steerable basis
   (:func:`~cryo_lightning.abinitio.image_alignment.align_coefficients`), with shifts by polar
   cross-correlation (:func:`~cryo_lightning.abinitio.image_alignment.align`). Either way the
   images aligned are those of step 1 (denoised and CTF-free by default).
5. **Averaging** (:mod:`cryo_lightning.abinitio.aligned_average`): the *original* images, rotated
   and shifted in Fourier space, averaged with their CTFs as the Wiener estimate of the CTF-free
   centre image.

Angles and shifts follow the conventions of :mod:`cryo_lightning.abinitio.image_alignment`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cryo_lightning.abinitio.aligned_average import aligned_average, wiener_regularization
from cryo_lightning.abinitio.image_alignment import align, align_coefficients
from cryo_lightning.abinitio.invariant_features import (_basis_for, _has_ctf, bispectrum_features,
                                                        steerable_coefficients)
from cryo_lightning.abinitio.neighbors import nearest_neighbors, select_centres
from cryo_lightning.physics.steerable_basis import FourierBesselBasis

__all__ = ["ClassAverages", "class_averages"]


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
