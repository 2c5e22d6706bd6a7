"""Expectation maximisation over poses and shifts: a 3D map from images whose poses are unknown,
and the posterior mean of each image given that map.

The model is RELION's: image ``i`` is ``Y_i = C_i P_hat(R) exp(2 pi i k . o) + noise`` with white
Gaussian noise of per-pixel variance ``sigma^2``, the rotation ``R`` uniform over a grid of ``M``
rotations and the origin ``o`` uniform over a grid of ``S`` shifts. Each iteration

1. **E-step**: the posterior weight of every (shift, rotation) for every image, from the
   log-likelihood ``(Re sum_k conj(Y_is) C_i P_m - 1/2 sum_k C_i^2 |P_m|^2) / (sigma^2 L^2)``
   summed over the frequencies ``|k| <= k_max`` that the current map resolves (``Y_is`` the image
   with shift ``s`` undone): two matrix products per chunk of the grid;
2. **M-step**: direct Fourier inversion, as RELION's back-projector does: the weighted sums
   ``sum_is w_ism C_i Y_is`` and ``sum_i w_im C_i^2`` are inserted into a twice-oversampled 3D
   spectrum by the adjoint of the projector's trilinear interpolation, separately for two random
   half sets; their Fourier shell correlation gives the signal-to-noise ratio per shell, and the
   map is the Wiener estimate ``sum C Y / (sum C^2 + tau^-2)`` with ``tau^-2`` from that ratio
   (RELION's ``tau2_fudge = 1``), masked by a soft sphere;
3. **resolution**: the next ``k_max`` is two shells beyond the last one whose half-set FSC is at
   least 0.143; it grows by at most two shells per iteration and never shrinks, so early
   iterations align coarse features only.

The grid is turned by a random rotation every iteration, so that the poses it samples are not
always the same ones. Ab initio, the first map is the reconstruction from random poses, low-passed
to ``initial_shell``: a blob with the images' power, from which EM grows a structure.

On boxes larger than ``coarse_box`` (32 by default), ab initio runs coarse to fine, as RELION's
and cryoSPARC's initial models do: the iterations above on the images Fourier-cropped to the
coarse box (the same frequencies up to its Nyquist), then a map at the full box from each image's
most probable pose, refined by a few full-box iterations. Finding the structure needs low
frequencies only, and the coarse box costs ``(coarse_box / L)^2`` as much per iteration.

The half-set FSC is *not* an independent resolution estimate here (both halves are aligned to
the same map, so noise fitted by the alignment correlates); it sets the Wiener filter and the
resolution schedule, as it does in RELION's refinement before the gold-standard split.

Costs per iteration and set: ``O(N S M K)`` for the E-step and for the sums of the M-step (``K``
the frequencies used); memory ``O(N S M)`` for the weights, stored once (0.46 GB at ``N = 512``,
``S = 49``, ``M = 4608``), and ``O(M L^2 + N L^2)`` besides: the shifted spectra are formed one
shift at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cryo_lightning.denoise.oracle import rotation_grid
from cryo_lightning.physics.fourier import fft2c, fft3c, fourier_resize, ifft2c, ifft3c, radial_grid
from cryo_lightning.physics.noise import estimate_noise_variance
from cryo_lightning.physics.projection import insert_slices, project_spectrum, translate_spectrum, volume_spectrum
from cryo_lightning.physics.rotations import random_rotations
from cryo_lightning.physics.volumes import soft_sphere_mask

__all__ = ["EMResult", "shift_grid", "expectation_maximization", "VERSION"]

# Raised whenever a change alters the results: caches of EM guides record it (cryol cache-guides).
VERSION = 2

_OVERSAMPLING = 2
_M_STEP_MARGIN = 4  # shells beyond the E-step's limit that the M-step reconstructs
_MASK_EDGE = 3.0  # pixels of the mask's cosine edge, which ends at the box's inscribed sphere


@dataclass
class EMResult:
    """What :func:`expectation_maximization` returns.

    Attributes:
        volume: ``(B, L, L, L)`` the final maps, ``(z, y, x)``, in the images' units per voxel.
        denoised: ``(B, N, L, L)`` posterior mean of each clean, CTF-affected image given its map.
        fsc: ``(B, L // 2 + 1)`` half-set FSC of the last M-step (not independent: module docstring).
        k_max: ``(B,)`` the last E-step's frequency limit (pixels of the spectrum).
        max_weight: ``(B, N)`` each image's largest posterior weight (1: one pose; ``1 / (S M)``: none).
        best_rotation: ``(B, N, 3, 3)`` and best_origin ``(B, N, 2)``: the most probable pose.
        log_likelihood: ``(B, iterations)`` mean log marginal likelihood per image, per iteration.
    """

    volume: torch.Tensor
    denoised: torch.Tensor
    fsc: torch.Tensor
    k_max: torch.Tensor
    max_weight: torch.Tensor
    best_rotation: torch.Tensor
    best_origin: torch.Tensor
    log_likelihood: torch.Tensor = field(default_factory=lambda: torch.empty(0))


def shift_grid(max_shift: float, step: float = 1.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Origins on a square grid of spacing ``step`` pixels within ``|o_x|, |o_y| <= max_shift``:
    ``(S, 2)`` ``(x, y)``, the zero shift first."""
    n = int(math.floor(max_shift / step + 1e-9))
    axis = torch.arange(-n, n + 1, device=device, dtype=dtype) * step
    oy, ox = torch.meshgrid(axis, axis, indexing="ij")
    grid = torch.stack([ox.flatten(), oy.flatten()], dim=-1)
    order = torch.argsort(grid.square().sum(-1), stable=True)
    return grid[order]


class _Set:
    """One set's fixed data, its images reordered so that half set A comes first.

    The shifted spectra ``C_i Y_is`` are never stored for every shift at once (``N S L^2``
    complex numbers, 0.8 GB at ``N = 512, L = 64``): each is the product of ``C_i Y_i`` with the
    shift's phase ramp, formed when it is used.
    """

    def __init__(self, noisy: torch.Tensor, ctf: torch.Tensor, sigma2: float, shifts: torch.Tensor,
                 order: torch.Tensor, n_first: int) -> None:
        N, L = noisy.shape[0], noisy.shape[-1]
        self.N, self.L, self.S, self.n_first = N, L, len(shifts), n_first
        self.radius = radial_grid(L, 2, device=noisy.device, dtype=noisy.dtype).flatten()  # spectrum pixels
        self.inside = self.radius <= L / 2  # the projector's support
        noisy, ctf = noisy[order], ctf[order]
        self.CY = (ctf * fft2c(noisy)).flatten(-2) * self.inside  # (N, L^2)
        self.C2 = (ctf * ctf).flatten(-2) * self.inside  # (N, L^2)
        # phase[s] undoes shift s: C Y_s = C Y * phase[s] (translate_spectrum's ramp)
        ones = torch.ones(len(shifts), L, L, dtype=self.CY.dtype, device=noisy.device)
        self.phase = translate_spectrum(ones, shifts).flatten(-2)  # (S, L^2)
        self.norm = sigma2 * L * L
        self.shifts = shifts

    def halves(self) -> tuple[slice, slice]:
        return slice(0, self.n_first), slice(self.n_first, self.N)


def _mask(L: int, device, dtype) -> torch.Tensor:
    """The soft sphere every map is multiplied by: its cosine edge ends at the inscribed sphere."""
    return soft_sphere_mask(L, L / 2 - _MASK_EDGE, _MASK_EDGE, device, dtype)


def _real(z: torch.Tensor) -> torch.Tensor:
    """``(..., K)`` complex as ``(..., 2K)`` real: Re z . Re w + Im z . Im w = Re(z conj(w))."""
    return torch.cat([z.real, z.imag], dim=-1)


def _shells(L: int, device, dtype) -> torch.Tensor:
    """Shell index (pixels of the original spectrum) of every padded-grid voxel, ``(Lp^3,)``."""
    Lp = _OVERSAMPLING * L
    q = torch.arange(Lp, device=device, dtype=dtype) - Lp // 2
    r = torch.sqrt(q[:, None, None] ** 2 + q[None, :, None] ** 2 + q[None, None, :] ** 2) / _OVERSAMPLING
    return torch.round(r).long().flatten()


def _shell_mean(values: torch.Tensor, shells: torch.Tensor, n: int) -> torch.Tensor:
    keep = shells < n
    sums = values.new_zeros(n).index_add_(0, shells[keep], values[keep])
    counts = torch.bincount(shells[keep], minlength=n).to(values.dtype).clamp_min(1)
    return sums / counts


def _maximise(halves: list[torch.Tensor], L: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Wiener-filtered map ``(L, L, L)`` and half-set FSC ``(L // 2 + 1,)`` from two insertions."""
    n = L // 2 + 1
    shells = _shells(L, mask.device, mask.dtype)
    keep = shells < n
    estimates = []
    for h in halves:
        num, den = torch.complex(h[0], h[1]).flatten(), h[2].flatten()
        estimates.append(num / (den + 1e-3 * den.mean()))
    a, b = estimates
    cross = _shell_mean((a * b.conj()).real, shells, n)
    pa, pb = _shell_mean(a.abs().square(), shells, n), _shell_mean(b.abs().square(), shells, n)
    fsc = cross / (pa * pb).sqrt().clamp_min(torch.finfo(pa.dtype).tiny)
    f = fsc.clamp(1e-3, 0.999)
    snr_full = 2 * f / (1 - f)  # the full set has twice each half's signal-to-noise ratio
    num = torch.complex(halves[0][0] + halves[1][0], halves[0][1] + halves[1][1]).flatten()
    den = (halves[0][2] + halves[1][2]).flatten()
    tau_inv = _shell_mean(den, shells, n) / snr_full  # RELION: 1 / tau^2 = mean weight / SSNR
    reg = torch.where(keep, tau_inv[shells.clamp_max(n - 1)], torch.full_like(den, math.inf))
    total = den + reg
    # voxels no slice reached (beyond the M-step's band) hold no data: zero, not 0 / 0
    spectrum = torch.where(keep & (total > 0), num / total.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))
    Lp = _OVERSAMPLING * L
    padded = ifft3c(spectrum.reshape(Lp, Lp, Lp)).real
    s = Lp // 2 - L // 2
    return padded[s : s + L, s : s + L, s : s + L] * mask, fsc


def _last_resolved_shell(fsc: torch.Tensor, threshold: float = 0.143) -> int:
    """The last shell ``k >= 1`` before the FSC first drops below ``threshold`` (0 if shell 1 does)."""
    below = (fsc[1:] < threshold).nonzero()
    return int(below[0]) if len(below) else len(fsc) - 1


@torch.no_grad()
def expectation_maximization(
    noisy: torch.Tensor,
    ctf: torch.Tensor | None = None,
    noise_variance: torch.Tensor | float | None = None,
    initial: torch.Tensor | None = None,
    iterations: int = 15,
    n_rotations: int = 4608,
    max_shift: float = 3.0,
    shift_step: float = 1.0,
    initial_shell: int = 3,
    chunk: int = 1152,
    generator: torch.Generator | None = None,
    coarse_box: int | None = 32,
    refine_iterations: int = 5,
) -> EMResult:
    """Reconstruct each set's map by EM over poses and shifts, and denoise its images.

    Args:
        noisy: ``(B, N, L, L)`` images of one molecule per set.
        ctf: ``(B, N, L, L)`` centred CTFs (RELION sign), or None (no CTF).
        noise_variance: ``(B,)`` or scalar per-pixel noise variance in image units; None
            estimates it from the corners outside the inscribed disk.
        initial: ``(B, L, L, L)`` starting maps (refinement); None: ab initio from random poses.
        iterations: EM iterations.
        n_rotations: approximate size of the rotation grid (:func:`rotation_grid`).
        max_shift, shift_step: the origin grid (pixels), see :func:`shift_grid`.
        initial_shell: frequency limit (spectrum pixels) of the first iteration.
        chunk: grid rotations per matrix product (memory).
        generator: randomness of the half sets, the random start and the grid's turns.
        coarse_box: ab initio on a box larger than this runs coarse to fine: ``iterations`` on the
            images Fourier-cropped to ``coarse_box`` (same frequencies up to the coarse Nyquist,
            so the same shells), then the full-box map is reconstructed at each image's most
            probable coarse pose and refined by ``refine_iterations`` more at the full box.
            None: every iteration at the full box.
        refine_iterations: full-box iterations after the coarse stage.
    Returns:
        :class:`EMResult`. After a coarse stage its ``log_likelihood`` holds the coarse
        iterations' values followed by the full box's (the two are not on one scale).
    """
    B, N, L = noisy.shape[0], noisy.shape[1], noisy.shape[-1]
    if N < 2:
        raise ValueError(f"EM needs at least 2 images per set (two half sets), got {N}")
    device, dtype = noisy.device, noisy.dtype
    if ctf is None:
        ctf = torch.ones_like(noisy)
    if noise_variance is None:
        noise_variance = estimate_noise_variance(noisy).mean(-1)
    sigma2 = torch.as_tensor(noise_variance, dtype=dtype, device=device).reshape(-1).expand(B)
    g = generator if generator is not None else torch.Generator(device="cpu").manual_seed(0)
    if initial is None and coarse_box is not None and L > coarse_box:
        return _coarse_to_fine(noisy, ctf, sigma2, iterations, refine_iterations, coarse_box,
                               dict(n_rotations=n_rotations, max_shift=max_shift, shift_step=shift_step,
                                    initial_shell=initial_shell, chunk=chunk), g)
    shifts = shift_grid(max_shift, shift_step, device, dtype)
    base_grid = rotation_grid(n_rotations, device=device, dtype=dtype)
    mask = _mask(L, device, dtype)

    out = {k: [] for k in ("volume", "denoised", "fsc", "k_max", "max_weight", "rotation", "origin", "ll")}
    for b in range(B):
        half = (torch.randperm(N, generator=g) < N // 2).to(device)
        order = torch.cat([half.nonzero().squeeze(1), (~half).nonzero().squeeze(1)])
        data = _Set(noisy[b], ctf[b], float(sigma2[b]), shifts, order, int(half.sum()))
        if initial is None:
            weights = torch.zeros(data.S, N, len(base_grid), device=device, dtype=dtype)
            start = torch.randint(len(base_grid), (N,), generator=g).to(device)[order]
            weights[0, torch.arange(N, device=device), start] = 1
            volume, fsc = _m_step(data, weights, base_grid, mask, data.radius <= initial_shell, chunk)
            volume = _low_pass(volume, initial_shell)
            del weights
        else:
            volume = initial[b].to(dtype)
            fsc = torch.full((L // 2 + 1,), math.nan, device=device, dtype=dtype)  # no M-step yet
        k_max, lls, grid = initial_shell, [], base_grid
        for it in range(iterations):
            turn = random_rotations(1, generator=g, dtype=dtype).to(device)[0]
            grid = base_grid @ turn  # A_m R0: the same grid, turned
            band = data.radius <= k_max
            weights = _e_step(data, _projections(volume, grid, band, chunk), band)
            lls.append(float(_normalise(weights).mean()))
            volume, fsc = _m_step(data, weights, grid, mask, data.radius <= k_max + _M_STEP_MARGIN, chunk)
            del weights
            shell = _last_resolved_shell(fsc)
            k_max = int(min(L // 2, max(k_max, min(shell + 2, k_max + 2))))
        # the map holds nothing beyond the M-step's band: the mean is summed over it alone, and
        # the E-step's band is inside it, so one set of projections serves both
        band, keep = data.radius <= k_max, data.radius <= k_max + _M_STEP_MARGIN
        P = _projections(volume, grid, keep, chunk)
        weights = _e_step(data, P[:, band[keep]], band)
        _normalise(weights)
        mean = _posterior_mean(data, weights, P, keep)
        inverse = torch.argsort(order)
        out["denoised"].append(ifft2c(ctf[b] * mean[inverse].reshape(N, L, L)).real)
        best_over_m, m_index = weights.max(2)  # (S, N)
        best_w, s_index = best_over_m.max(0)  # (N,)
        m_index = m_index.gather(0, s_index[None]).squeeze(0)
        out["max_weight"].append(best_w[inverse])
        out["rotation"].append(grid[m_index[inverse]])
        out["origin"].append(shifts[s_index[inverse]])
        del weights
        out["volume"].append(volume)
        out["fsc"].append(fsc)
        out["k_max"].append(k_max)
        out["ll"].append(torch.tensor(lls, dtype=dtype))
    return EMResult(
        volume=torch.stack(out["volume"]), denoised=torch.stack(out["denoised"]), fsc=torch.stack(out["fsc"]),
        k_max=torch.tensor(out["k_max"]), max_weight=torch.stack(out["max_weight"]),
        best_rotation=torch.stack(out["rotation"]), best_origin=torch.stack(out["origin"]),
        log_likelihood=torch.stack(out["ll"]) if iterations else torch.empty(B, 0),
    )


def _projections(volume: torch.Tensor, grid: torch.Tensor, band: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(M, K)`` complex: the map's central slices on the frequencies in ``band``."""
    spectrum = volume_spectrum(volume, _OVERSAMPLING, "linear")
    return torch.cat([project_spectrum(spectrum, grid[i : i + chunk]).flatten(-2)[:, band]
                      for i in range(0, len(grid), chunk)])


def _e_step(data: _Set, P: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """``(S, N, M)`` log-likelihoods (up to a per-image constant) of the projections ``P (M, K)``
    on the frequencies in ``band``: ``(Re sum_k conj(C Y_s) P_m - 1/2 sum_k C^2 |P_m|^2) /
    (sigma^2 L^2)``, one product per shift."""
    Pr = _real(P).T.contiguous()  # (2K, M)
    CY, phase = data.CY[:, band], data.phase[:, band]
    power = 0.5 * (data.C2[:, band] @ P.abs().square().T)  # (N, M)
    logits = power.new_empty(data.S, data.N, len(P))
    for s in range(data.S):
        torch.matmul(_real(CY * phase[s]), Pr, out=logits[s])
        logits[s].sub_(power)
    return logits.div_(data.norm)


def _m_step(data: _Set, weights: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor, band: torch.Tensor,
            chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map and half-set FSC from the posterior weights ``(S, N, M)``, summing the frequencies in
    ``band`` only: beyond the resolution the Wiener filter would zero them anyway, and the sums
    are the M-step's main cost."""
    M, L, K = len(grid), data.L, int(band.sum())
    CY, phase = data.CY[:, band], data.phase[:, band]
    total = weights.sum(0)  # (N, M): each image's weight per rotation, over all shifts
    halves = []
    for h in data.halves():
        sums = CY.real.new_zeros(M, 2 * K)  # sum_is w_ism C_i Y_is as (Re, Im)
        for s in range(data.S):
            sums.addmm_(weights[s, h].T, _real(CY[h] * phase[s]))
        power = total[h].T @ data.C2[h][:, band]  # sum_i w_im C_i^2, (M, K)
        inserted = 0
        for i in range(0, M, chunk):  # insertion is linear: chunks of the grid bound its memory
            part = slice(i, i + chunk)
            slices = sums.new_zeros(3, len(grid[part]), L * L)
            slices[0][:, band], slices[1][:, band], slices[2][:, band] = sums[part, :K], sums[part, K:], power[part]
            inserted = inserted + insert_slices(slices.reshape(3, -1, L, L), grid[part], L, _OVERSAMPLING,
                                                band.reshape(L, L))
        halves.append(inserted)
    return _maximise(halves, L, mask)


def _posterior_mean(data: _Set, weights: torch.Tensor, P: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """``(N, L^2)`` complex: each image's posterior mean spectrum before its CTF, every shift put
    back, from the projections ``P (M, K)`` on the frequencies in ``band``."""
    Pc = _real(P)  # (M, 2K)
    K = P.shape[-1]
    mean = P.new_zeros(data.N, K)
    for s in range(data.S):
        m = weights[s] @ Pc
        mean += torch.complex(m[:, :K], m[:, K:]) * data.phase[s, band].conj()
    out = P.new_zeros(data.N, data.L * data.L)
    out[:, band] = mean
    return out


def _normalise(logits: torch.Tensor) -> torch.Tensor:
    """``(N,)`` log marginal likelihoods; ``logits (S, N, M)`` become posterior weights in place."""
    lse = torch.logsumexp(torch.logsumexp(logits, dim=2), dim=0)
    logits.sub_(lse[None, :, None]).exp_()
    return lse


def _coarse_to_fine(noisy: torch.Tensor, ctf: torch.Tensor, sigma2: torch.Tensor, iterations: int,
                    refine_iterations: int, coarse_box: int, settings: dict, g: torch.Generator) -> EMResult:
    """Ab initio on Fourier-cropped images, then refinement at the full box (see ``coarse_box``)."""
    L = noisy.shape[-1]
    ratio = coarse_box / L
    start = L // 2 - coarse_box // 2
    crop = slice(start, start + coarse_box)
    # Cropping the centred spectrum keeps the frequencies below the coarse Nyquist: the images'
    # noise variance per pixel scales by ratio^2 (fourier_resize keeps each coefficient's
    # amplitude), the CTF is its own centre, and shifts shrink with the pixels.
    coarse = expectation_maximization(
        fourier_resize(noisy, coarse_box, 2), ctf[..., crop, crop], sigma2 * ratio**2, iterations=iterations,
        **{**settings, "max_shift": settings["max_shift"] * ratio}, generator=g, coarse_box=None)
    mask = _mask(L, noisy.device, noisy.dtype)
    results = []
    for b in range(noisy.shape[0]):
        volume = _reconstruct(noisy[b], ctf[b], coarse.best_rotation[b], coarse.best_origin[b] / ratio, mask, g)
        results.append(expectation_maximization(
            noisy[b : b + 1], ctf[b : b + 1], sigma2[b : b + 1], initial=volume[None], iterations=refine_iterations,
            **{**settings, "initial_shell": int(coarse.k_max[b])}, generator=g, coarse_box=None))
    cat = {k: torch.cat([getattr(r, k) for r in results]) for k in
           ("volume", "denoised", "fsc", "k_max", "max_weight", "best_rotation", "best_origin", "log_likelihood")}
    cat["log_likelihood"] = torch.cat([coarse.log_likelihood, cat["log_likelihood"]], dim=1)
    return EMResult(**cat)


def _reconstruct(noisy: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor, origins: torch.Tensor,
                 mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Wiener map ``(L, L, L)`` of images ``(N, L, L)`` at known poses (direct Fourier inversion)."""
    N, L = noisy.shape[0], noisy.shape[-1]
    inside = radial_grid(L, 2, device=noisy.device, dtype=noisy.dtype) <= L / 2  # the projector's support
    CY = ctf * translate_spectrum(fft2c(noisy), origins) * inside
    slices = torch.stack([CY.real, CY.imag, ctf * ctf * inside])
    half = (torch.randperm(N, generator=g) < N // 2).to(noisy.device)
    halves = [insert_slices(slices[:, h], rotations[h], L, _OVERSAMPLING) for h in (half, ~half)]
    return _maximise(halves, L, mask)[0]


def _low_pass(volume: torch.Tensor, shell: float) -> torch.Tensor:
    L = volume.shape[-1]
    r = radial_grid(L, 3, device=volume.device, dtype=volume.dtype)
    return ifft3c(fft3c(volume) * (r <= shell)).real
