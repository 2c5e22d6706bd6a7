"""Quality measures that need no ground truth: moment consistency, cross-validation FRC and the
FSC of two half-map files.

Both compare denoised particle images with the raw images they came from, using only what the
raw data themselves determine:

* **Moment consistency.** Denoised images ``d_i`` estimate the clean, CTF-affected particles
  ``x_i`` of raw images ``y_i = x_i + n_i``. Their first and second moments (no debiasing) should
  then match the noise-debiased moments of the raw images (:mod:`~cryo_lightning.abinitio.image_moments`),
  per CTF group and per angular block ``k`` of the steerable basis::

      r1   = ||M1[d] - M1[y]||_F / ||M1[y]||_F
      r2_k = ||M2_k[d] - (M2_k[y] - sigma^2 I)||_F / ||M2_k[y] - sigma^2 I||_F

  with group terms added in quadrature, weighted by the groups' image counts. The yardstick is
  the raw estimate's own sampling error (``ImageMoments.m1_error`` / ``m2_error``, same
  normalisation): a ratio ``r / error`` well above 1 is a real mismatch. It is conservative:
  the raw error includes the signal's own image-to-image variation, which cancels in the paired
  difference, so a perfect denoiser sits below 1. ``tr M2_k[d] / tr M2_k[y]`` tells the sign
  of a mismatch: below 1 the denoiser removed signal variance (shrinkage; a posterior-mean
  denoiser always does, by the variance it cannot resolve), above 1 it added variance that the
  raw data do not support (hallucination, or leftover noise).

* **Cross-validation FRC.** The particles are split into two half sets. A map is reconstructed
  (least squares with known poses and CTFs, :func:`~cryo_lightning.abinitio.least_squares_reconstruction.reconstruct`)
  from the raw images of one half, projected with the CTFs and origins of the other half's
  particles, and each image of the other half (raw, and denoised) is compared with its predicted
  projection by the Fourier ring correlation; curves are averaged over images and over both
  directions. The map's noise is independent of the other half's noise, so noise cannot raise
  the correlation: a higher FRC for the denoised images than for the raw ones is signal the
  denoiser recovered, and a lower one is signal it destroyed.

Everything is pure torch (no Lightning).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from cryo_lightning.abinitio.image_moments import (ImageMoments, MomentEstimator, MomentLayout, moment_discrepancy,
                                                  squared_norm)
from cryo_lightning.abinitio.least_squares_reconstruction import forward_operator, reconstruct
from cryo_lightning.io.errors import InputError
from cryo_lightning.io.mrc import read_map, require_cubic
from cryo_lightning.metrics import frc_curve
from cryo_lightning.physics.fourier import fourier_shell_correlation, resolution_at

__all__ = ["MomentConsistency", "moment_consistency", "image_moment_consistency", "half_sets", "CrossValidationFRC", "cross_validation_frc",
           "FSC_THRESHOLDS", "shell_frequencies", "half_map_fsc"]


@dataclass
class MomentConsistency:
    """Denoised-image moments against noise-debiased raw moments (module docstring).

    All differences and errors are relative to the raw moment's norm (count-weighted quadrature
    sum over CTF groups); errors are root expected squared errors of the raw estimate.

    Attributes:
        m1_difference, m1_error: ``r1`` and the raw ``M1``'s relative sampling error.
        m2_difference, m2_error: ``(K,)`` lists, ``r2_k`` and the raw ``M2_k``'s relative
            sampling error for ``k = 0..K-1``.
        m2_energy_ratio: ``(K,)`` ``tr M2_k[denoised] / tr M2_k[raw, debiased]``; NaN where the
            raw trace is within its sampling error of 0 (a block the raw data do not resolve).
        m2_total_difference, m2_total_error: the same over all kept blocks together.
        m2_total_energy_ratio: ``tr M2[denoised] / tr M2[raw, debiased]`` over all kept blocks
            (NaN under the same condition).
        discrepancy: ``r1^2 + r2^2`` (all blocks), i.e.
            :func:`~cryo_lightning.abinitio.image_moments.moment_discrepancy`; ``expected_discrepancy``
            is the same sum of the squared relative sampling errors of the raw moments, about the
            discrepancy of exact denoised moments (an upper estimate, as for the ratios).
        group_counts: images per CTF group.
    """

    m1_difference: float
    m1_error: float
    m2_difference: list[float]
    m2_error: list[float]
    m2_energy_ratio: list[float]
    m2_total_difference: float
    m2_total_error: float
    m2_total_energy_ratio: float
    discrepancy: float
    expected_discrepancy: float
    group_counts: list[int] = field(default_factory=list)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / den.clamp_min(torch.finfo(torch.float64).tiny)


def moment_consistency(raw: ImageMoments, denoised: ImageMoments) -> MomentConsistency:
    """Compare the moments of denoised images with the debiased moments of their raw images.

    Args:
        raw: moments of the raw images, noise-debiased, with sampling errors
            (``m1_error``, ``m2_error`` not None), ``G`` CTF groups.
        denoised: moments of the denoised images of the same particles in the same groups, not
            debiased (``noise_variance`` 0).
    Returns:
        :class:`MomentConsistency`.
    Raises:
        ValueError: the two have different layouts or groups, or ``raw`` has no sampling error.
    """
    if raw.m1_error is None or raw.m2_error is None:
        raise ValueError("the raw moments need their sampling errors (estimate them from images)")
    if raw.m1.shape != denoised.m1.shape or len(raw.m2) != len(denoised.m2) or \
            not torch.equal(raw.counts, denoised.counts):
        raise ValueError("raw and denoised moments must share the layout and the CTF groups")
    w = raw.weights  # (G,)
    m1_norm = (w * squared_norm(raw.m1)).sum()
    m1_diff = (w * squared_norm(denoised.m1 - raw.m1)).sum()
    m1_err = (w * raw.m1_error).sum()
    norms = torch.stack([(w * squared_norm(b)).sum() for b in raw.m2])  # (K,)
    diffs = torch.stack([(w * squared_norm(d - r)).sum() for d, r in zip(denoised.m2, raw.m2)])
    errs = (w[:, None] * raw.m2_error).sum(0)  # (K,)

    def trace(blocks: list[torch.Tensor]) -> torch.Tensor:  # (K,) count-weighted trace per block
        return torch.stack([(w * torch.diagonal(b, dim1=-2, dim2=-1).real.sum(-1)).sum() for b in blocks])

    tr_raw, tr_den = trace(raw.m2), trace(denoised.m2)
    # |tr E| <= sqrt(Q) ||E||_F: a raw trace below that bound on its sampling error is
    # indistinguishable from 0 (a noise-dominated block), and the ratio would be meaningless
    sizes = torch.tensor([b.shape[-1] for b in raw.m2], dtype=torch.float64, device=tr_raw.device)
    resolved = tr_raw > (sizes * errs).sqrt()
    energy = torch.where(resolved, _ratio(tr_den, tr_raw), torch.full_like(tr_raw, math.nan))
    total_resolved = bool(tr_raw.sum() > (sizes * errs).sum().sqrt())
    r1_err, r2_err = _ratio(m1_err, m1_norm), _ratio(errs.sum(), norms.sum())
    return MomentConsistency(
        m1_difference=float(_ratio(m1_diff, m1_norm).sqrt()),
        m1_error=float(_ratio(m1_err, m1_norm).sqrt()),
        m2_difference=_ratio(diffs, norms).sqrt().tolist(),
        m2_error=_ratio(errs, norms).sqrt().tolist(),
        m2_energy_ratio=energy.tolist(),
        m2_total_difference=float(_ratio(diffs.sum(), norms.sum()).sqrt()),
        m2_total_error=float(r2_err.sqrt()),
        m2_total_energy_ratio=float(_ratio(tr_den.sum(), tr_raw.sum())) if total_resolved else math.nan,
        discrepancy=float(moment_discrepancy(denoised, raw)),
        expected_discrepancy=float(r1_err + r2_err),
        group_counts=[int(c) for c in raw.counts.tolist()],
    )


def half_sets(random_subset: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Half set (1 or 2) of each particle: RELION's ``rlnRandomSubset`` when every particle has
    one, else by the parity of its row in the file (row 0 in half 1).

    Args:
        random_subset: ``(n,)`` int, 1 or 2, 0 where absent.
        rows: ``(n,)`` int, 0-based rows in the particle file.
    Returns:
        ``(n,)`` int64 subsets and where they came from (``"rlnRandomSubset"`` or ``"even/odd rows"``).
    """
    subsets = torch.as_tensor(random_subset, dtype=torch.int64)
    if subsets.numel() and bool(((subsets == 1) | (subsets == 2)).all()) and len(torch.unique(subsets)) == 2:
        return subsets, "rlnRandomSubset"
    return torch.as_tensor(rows, dtype=torch.int64) % 2 + 1, "even/odd rows"


def image_moment_consistency(raw: torch.Tensor, denoised: torch.Tensor, noise_variance: torch.Tensor,
                             groups: torch.Tensor | None, n_groups: int, k_max: int, bandlimit: float,
                             chunk: int = 1024) -> MomentConsistency:
    """:func:`moment_consistency` from images: noise-debiased moments of the raw images and plain
    moments of the denoised ones, per CTF group, accumulated in chunks of ``chunk`` images.

    Args:
        raw, denoised: ``(n, L, L)`` the same particles in the same units.
        noise_variance: ``(n,)`` the raw images' noise variance in those units.
        groups: ``(n,)`` CTF group of each image (``0..n_groups-1``), or None for one group.
        n_groups, k_max, bandlimit: see :class:`~cryo_lightning.abinitio.image_moments.MomentLayout`
            and :class:`~cryo_lightning.abinitio.image_moments.MomentEstimator`.
    """
    layout = MomentLayout(raw.shape[-1], k_max, bandlimit, device=raw.device)
    raw_est, den_est = MomentEstimator(layout, n_groups), MomentEstimator(layout, n_groups)
    for s in tqdm(range(0, raw.shape[0], chunk), desc="moments", unit="chunk", disable=None):
        sl = slice(s, s + chunk)
        g = None if groups is None else groups[sl]
        raw_est.update(raw[sl], g, noise_variance[sl])
        den_est.update(denoised[sl], g, None)
    return moment_consistency(raw_est.result(), den_est.result())


@dataclass
class CrossValidationFRC:
    """Cross-validation FRC of image sets against projections of the other half's raw map.

    Attributes:
        frc: label -> ``(L // 2 + 1,)`` FRC per one-pixel ring, averaged over all images of both
            halves (each against the map of the other half).
        stderr: label -> ``(L // 2 + 1,)`` standard error of that mean over images.
        n_images: images compared (both halves).
        residuals: per half map, the CG relative residuals.
    """

    frc: dict[str, torch.Tensor]
    stderr: dict[str, torch.Tensor]
    n_images: int
    residuals: list[list[float]] = field(default_factory=list)


def cross_validation_frc(
    reference_images: torch.Tensor, compare: Mapping[str, torch.Tensor], rotations: torch.Tensor,
    subsets: torch.Tensor, ctf: torch.Tensor | None = None, origins: torch.Tensor | None = None,
    lam: float = 1e-2, iterations: int = 30, chunk: int = 256, progress: bool = True,
) -> CrossValidationFRC:
    """Reconstruct from ``reference_images`` of each half set, compare the other half's images.

    Args:
        reference_images: ``(n, L, L)`` images the half maps are reconstructed from (the raw
            particles: their noise is independent between halves).
        compare: label -> ``(n, L, L)`` images of the same particles to score (e.g. ``"raw"``
            and ``"denoised"``); particle ``i`` of half ``h`` is compared with the projection of
            the map of half ``3 - h`` at its pose, CTF and origin.
        rotations: ``(n, 3, 3)`` RELION rotation matrices.
        subsets: ``(n,)`` 1 or 2 (:func:`half_sets`); both halves must be non-empty.
        ctf: ``(n, L, L)`` effective CTFs of the images, or None.
        origins: ``(n, 2)`` RELION origins in pixels, or None.
        lam, iterations: of :func:`~cryo_lightning.abinitio.least_squares_reconstruction.reconstruct`.
        chunk: images projected at a time (memory).
        progress: show a progress bar over the two half maps.
    Returns:
        :class:`CrossValidationFRC`; the FRC is scale-free, so the images' units do not matter.
    """
    for label, images in compare.items():
        if images.shape != reference_images.shape:
            raise ValueError(f"{label}: shape {tuple(images.shape)} differs from the reference images' "
                             f"{tuple(reference_images.shape)}")
    if not all(bool((subsets == h).any()) for h in (1, 2)):
        raise ValueError("both half sets need at least one image")

    def take(t: torch.Tensor | None, sel: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t[sel]

    curves: dict[str, list[torch.Tensor]] = {label: [] for label in compare}
    residuals = []
    for h in tqdm((1, 2), desc="half maps", unit="map", disable=None if progress else True):
        built, scored = subsets == h, torch.nonzero(subsets == 3 - h).flatten()
        result = reconstruct(reference_images[built], rotations[built], take(ctf, built), take(origins, built),
                             lam=lam, iterations=iterations)
        residuals.append(result.residuals)
        for s in range(0, len(scored), chunk):
            idx = scored[s : s + chunk]
            predicted = forward_operator(result.volume, rotations[idx], take(ctf, idx), take(origins, idx))
            for label, images in compare.items():
                curves[label].append(frc_curve(images[idx], predicted).double().cpu())
    frc, stderr = {}, {}
    for label, parts in curves.items():
        per_image = torch.cat(parts)  # (n, L // 2 + 1)
        frc[label] = per_image.mean(0)
        stderr[label] = per_image.std(0) / per_image.shape[0] ** 0.5 if per_image.shape[0] > 1 \
            else torch.zeros_like(frc[label])
    return CrossValidationFRC(frc, stderr, int(subsets.numel()), residuals)


# -- half maps ---------------------------------------------------------------------------------

FSC_THRESHOLDS = (0.143, 0.5)


def shell_frequencies(L: int, pixel: float) -> list[float]:
    """Spatial frequency of each one-pixel shell ``0..L//2`` in 1/Angstrom."""
    return (np.arange(L // 2 + 1) / (L * pixel)).tolist()


def half_map_fsc(half1: str, half2: str, mask: str | None = None, pixel_size: float | None = None) -> dict:
    """FSC between two half maps (each multiplied by ``mask`` first) and its resolutions.

    Args:
        half1, half2: MRC maps, cubic, same box and voxel size.
        mask: optional MRC mask of the same box, values in [0, 1] (soft edges welcome: a sharp
            mask edge correlates the two maps' high frequencies and inflates the FSC).
        pixel_size: Angstrom, for maps whose header has none.
    Returns:
        dict with ``box``, ``pixel_size_A``, ``frequency_per_A`` and ``fsc`` per one-voxel shell
        (``L // 2 + 1``), and ``resolution_A`` at FSC 0.143 and 0.5 (``inf``, null in metrics.json:
        no correlation at all; Nyquist if it never falls below).
    """
    maps = [require_cubic(read_map(p)) for p in (half1, half2)]
    for path, m in zip((half1, half2), maps):  # an FSC of NaN maps reads as Nyquist resolution
        bad = int((~torch.isfinite(m.data)).sum())
        if bad:
            raise InputError(f"{path}: {bad} NaN/Inf voxel(s): no FSC is computed from a non-finite map")
    if maps[0].data.shape != maps[1].data.shape:
        raise InputError(f"{half2}: box {tuple(maps[1].data.shape)} differs from {half1}'s "
                         f"{tuple(maps[0].data.shape)}; half maps must be on the same grid")
    pixels = [m.pixel_size for m in maps if m.pixel_size]
    if pixels and abs(pixels[0] - pixels[-1]) > 1e-3 * pixels[0]:
        raise InputError(f"{half2}: voxel size {pixels[-1]:.4f} A differs from {half1}'s {pixels[0]:.4f} A; "
                         "resample one of them onto the other's grid")
    pixel = pixels[0] if pixels else pixel_size
    if pixel is None:
        raise InputError(f"{half1}: the header has no voxel size; pass --pixel-size")
    volumes = [m.data.double() for m in maps]
    if mask is not None:
        weights = require_cubic(read_map(mask)).data.double()
        if weights.shape != volumes[0].shape:
            raise InputError(f"{mask}: mask box {tuple(weights.shape)} differs from the half maps' "
                             f"{tuple(volumes[0].shape)}; resample the mask onto the maps' grid")
        if float(weights.min()) < -1e-3 or float(weights.max()) > 1 + 1e-3:
            raise InputError(f"{mask}: values run from {float(weights.min()):.3g} to {float(weights.max()):.3g}; "
                             "a mask holds weights in [0, 1] (e.g. from relion_mask_create)")
        volumes = [v * weights for v in volumes]
    L = volumes[0].shape[-1]
    fsc = fourier_shell_correlation(volumes[0], volumes[1], 3)
    result = {"maps": [str(half1), str(half2)], "mask": mask, "box": L, "pixel_size_A": pixel,
              "resolution_A": {str(t): resolution_at(fsc, t, L, pixel) for t in FSC_THRESHOLDS},
              "frequency_per_A": shell_frequencies(L, pixel), "fsc": fsc.tolist()}
    if torch.equal(maps[0].data, maps[1].data):
        result["warning"] = (f"{half1} and {half2} are identical: their FSC is 1 at every frequency and the "
                             "'resolution' is the Nyquist limit, which says nothing about the map; give half maps "
                             "reconstructed independently from the two half sets of particles")
    return result
