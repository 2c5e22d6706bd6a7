"""Oracle posterior-mean denoiser: knows the true volume, averages over a dense rotation grid.

It is a reference for how far a method is from the best possible, not a usable denoiser: it is
given the volume (and, for the exact oracle, the amplitude scale of the simulated images). Image
``i`` is modelled as ``y_i = s * F^-1[C_i P_hat(R)] + noise`` with ``R`` uniform over a grid of
``M`` rotations, known shifts, white Gaussian noise of per-pixel variance ``sigma^2``, and the
estimate is the posterior mean of the clean CTF-affected image::

    E[s C_i P(R) | y_i] = sum_m w_im s C_i P(R_m),   w_im ∝ exp(-||y_i - s C_i P(R_m)||^2 / (2 sigma^2)).

In Fourier space (Parseval, unnormalised DFT) the exponent is, up to a per-image constant,
``(s Re sum_k conj(Y_i) C_i P_hat_m - s^2 / 2 sum_k C_i^2 |P_hat_m|^2) / (sigma^2 L^2)``: one
matrix product of per-image features ``(N, 3 L^2)`` with per-rotation features ``(3 L^2, M)``.
The grid is streamed in chunks with a running log-sum-exp, so memory is ``O(N L^2 + chunk L^2)``
and time ``O(N M L^2)``; the projections of each volume are computed once per call (twice when
the scale is estimated).

Grid size: the oracle is only as good as the grid resolves the posterior. At ``L = 32`` (``N =
64``, CTF on) the default ``M = 32768`` (spacing ~7.7 degrees) is within ~5% of the ``M = 262144``
value at SNR 1/4 and within 1% at SNR 1/16 and below; ``M = 8192`` is 50% too high at SNR 1/4. The
spacing needed shrinks like ``1 / L``, so ``M`` should grow like ``L^3`` (~262k at ``L = 64``).

Amplitude scale: :class:`~cryo_lightning.data.set_simulator.SetSimulator` divides its images by
the raw noise standard deviation, so the clean images are ``s * CTF * P`` with an unknown ``s``
per set. Either pass ``scale`` (e.g. from :func:`fit_scale`, which uses the true rotations:
the exact oracle), or leave it ``None`` to estimate it from the noisy images by a method of
moments (the volume known only up to scale).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cryo_lightning.physics.fourier import fft2c, ifft2c
from cryo_lightning.physics.image_formation import clean_images
from cryo_lightning.physics.projection import (
    VolumeSpectrum,
    project_spectrum,
    translate_spectrum,
    volume_spectrum,
)
from cryo_lightning.physics.rotations import euler_to_matrix, random_rotations

__all__ = ["rotation_grid", "OracleResult", "fit_scale", "posterior_weights", "oracle_denoise"]


def rotation_grid(
    n: int,
    kind: str = "fibonacci",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A near-uniform grid of about ``n`` rotations on SO(3).

    ``"fibonacci"``: viewing directions on a Fibonacci sphere times equally spaced in-plane
    angles ``psi``. Uniform directions times uniform ``psi`` is the Haar measure in RELION's ZYZ
    angles; ``n_psi = round((pi n)^(1/3))`` makes the in-plane spacing ``2 pi / n_psi`` match the
    directions' spacing ``sqrt(4 pi / n_dir)``. Returns ``n_dir * n_psi`` rotations (within a
    few percent of ``n``). ``"random"``: exactly ``n`` Haar-random rotations from ``generator``.

    Returns:
        ``(M, 3, 3)`` RELION matrices ``A``.
    """
    if kind == "random":
        return random_rotations(n, generator=generator, device=device, dtype=dtype)
    if kind != "fibonacci":
        raise ValueError(f"kind must be 'fibonacci' or 'random', got {kind!r}")
    n_psi = max(1, round((math.pi * n) ** (1 / 3)))
    n_dir = max(1, round(n / n_psi))
    # Built in float64 on the CPU (not every accelerator has float64), then moved.
    j = torch.arange(n_dir, dtype=torch.float64)
    tilt = torch.rad2deg(torch.acos(1.0 - (2.0 * j + 1.0) / n_dir))
    rot = torch.remainder(j * (180.0 * (3.0 - math.sqrt(5.0))), 360.0)  # golden angle
    psi = torch.arange(n_psi, dtype=torch.float64) * (360.0 / n_psi)
    angles = torch.stack(torch.broadcast_tensors(rot[:, None], tilt[:, None], psi[None, :]), dim=-1)
    return euler_to_matrix(angles.reshape(-1, 3)).to(device=device, dtype=dtype)


@dataclass
class OracleResult:
    """Output of :func:`oracle_denoise` with ``return_details=True``.

    Attributes:
        denoised: ``(B, N, L, L)`` posterior mean of the clean CTF-affected images.
        best_rotation: ``(B, N, 3, 3)`` the grid rotation of highest posterior weight.
        max_weight: ``(B, N)`` that weight (1 = posterior on one grid point; ``1 / M`` = flat).
        scale: ``(B,)`` amplitude scale used.
    """

    denoised: torch.Tensor
    best_rotation: torch.Tensor
    max_weight: torch.Tensor
    scale: torch.Tensor


@contextlib.contextmanager
def _full_precision_matmul() -> Iterator[None]:
    # The log-likelihoods are differences of O(SNR L^2) terms: TF32/bf16 matmuls (enabled by
    # Lightning's "high"/"medium" precision) would perturb them by O(1) at high SNR.
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _spectrum(volume: torch.Tensor | VolumeSpectrum, oversampling: int, interpolation: str) -> VolumeSpectrum:
    if isinstance(volume, VolumeSpectrum):
        return volume
    return volume_spectrum(volume, oversampling, interpolation)


def _per_set(x: torch.Tensor | float, B: int, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=like.dtype, device=like.device).reshape(-1).expand(B)


def _grid(
    rotations: torch.Tensor | None, n_rotations: int, B: int, like: torch.Tensor
) -> torch.Tensor:
    """``(B, M, 3, 3)`` grid: the given one (shared or per set) or the default Fibonacci grid."""
    if rotations is None:
        rotations = rotation_grid(n_rotations, device=like.device, dtype=like.dtype)
    rotations = rotations.to(device=like.device, dtype=like.dtype)
    return rotations.expand(B, -1, 3, 3) if rotations.ndim == 3 else rotations


def _slices(spectrum: VolumeSpectrum, grid: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, P_hat)`` per chunk of the grid, ``P_hat`` ``(B, c, L * L)`` complex."""
    for start in range(0, grid.shape[1], chunk):
        yield start, project_spectrum(spectrum, grid[:, start : start + chunk]).flatten(-2)


def _data_spectra(noisy: torch.Tensor, origins: torch.Tensor | None) -> torch.Tensor:
    """Centred spectra of the images with known shifts undone: ``(B, N, L * L)`` complex."""
    Y = fft2c(noisy)
    if origins is not None:
        # The forward model shifts by -origins (image_formation); the phase factor is unitary,
        # so ||y - T x|| = ||T^-1 y - x|| and the likelihood is unchanged.
        Y = translate_spectrum(Y, origins.to(noisy.dtype))
    return Y.flatten(-2)


def _moment_scale(
    Y: torch.Tensor,
    C2: torch.Tensor,
    sigma2: torch.Tensor,
    spectrum: VolumeSpectrum,
    grid: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """Least-squares fit of ``|Y_i(k)|^2 - L^2 sigma^2 = s^2 C_i(k)^2 <|P_hat(k)|^2>_grid``, per set.

    The grid average stands in for the unknown rotations; at low SNR this unweighted fit is the
    efficient one (the variance of ``|Y|^2`` is then dominated by the noise, equal everywhere).
    """
    L2 = Y.shape[-1]
    power = torch.zeros(Y.shape[0], L2, dtype=C2.dtype, device=C2.device)
    for _, P in _slices(spectrum, grid, chunk):
        power += P.abs().square().sum(1)
    model = C2 * (power / grid.shape[1])[:, None]  # (B, N, L^2)
    excess = Y.abs().square() - L2 * sigma2[:, None, None]
    s2 = (model * excess).sum((1, 2)) / model.square().sum((1, 2)).clamp_min(torch.finfo(C2.dtype).tiny)
    return s2.clamp_min(0.0).sqrt()


def fit_scale(
    clean: torch.Tensor,
    volume: torch.Tensor | VolumeSpectrum,
    rotations: torch.Tensor,
    ctf: torch.Tensor | None = None,
    origins: torch.Tensor | None = None,
    oversampling: int = 2,
    interpolation: str = "linear",
) -> torch.Tensor:
    """Per-set scale ``s`` minimising ``||clean - s * clean_images(volume, rotations, ctf, origins)||``.

    This is the exact oracle's scale for simulated batches: it uses the true rotations and the
    clean images (``batch["clean"], batch["rotations"], batch["ctf"], batch["origins"]``).

    Args:
        clean: ``(B, N, L, L)``.
        volume: ``(B, L, L, L)`` or a :class:`VolumeSpectrum` of batch ``B``.
        rotations: ``(B, N, 3, 3)``.
        ctf: ``(B, N, L, L)`` or None; origins: ``(B, N, 2)`` pixels or None.
        oversampling, interpolation: projector settings (match the simulator's).
    Returns:
        ``(B,)``.
    """
    model = clean_images(_spectrum(volume, oversampling, interpolation), rotations, ctf, origins)
    norm = model.square().sum((1, 2, 3)).clamp_min(torch.finfo(clean.dtype).tiny)
    return (clean * model).sum((1, 2, 3)) / norm


def _features(
    noisy: torch.Tensor,
    ctf: torch.Tensor,
    noise_variance: torch.Tensor | float,
    spectrum: VolumeSpectrum,
    grid: torch.Tensor,
    scale: torch.Tensor | float | None,
    origins: torch.Tensor | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image likelihood features ``(B, N, 3 L^2)``, per-image CTFs ``(B, N, L^2)`` and scale ``(B,)``."""
    B, L = noisy.shape[0], noisy.shape[-1]
    sigma2 = _per_set(noise_variance, B, noisy)
    Y = _data_spectra(noisy, origins)
    C = ctf.expand_as(noisy).flatten(-2).to(noisy.dtype)
    if scale is None:
        s = _moment_scale(Y, C.square(), sigma2, spectrum, grid, chunk)
    else:
        s = _per_set(scale, B, noisy)
    s_ = s[:, None, None]
    feats = torch.cat([s_ * C * Y.real, s_ * C * Y.imag, -0.5 * s_.square() * C.square()], dim=-1)
    return feats / (sigma2[:, None, None] * L * L), C, s


def _rotation_features(P: torch.Tensor) -> torch.Tensor:
    """``(B, c, L^2)`` complex slices -> ``(B, 3 L^2, c)`` (real, imaginary, power)."""
    return torch.cat([P.real, P.imag, P.abs().square()], dim=-1).transpose(1, 2)


@torch.no_grad()
def posterior_weights(
    noisy: torch.Tensor,
    ctf: torch.Tensor,
    noise_variance: torch.Tensor | float,
    volume: torch.Tensor | VolumeSpectrum,
    rotations: torch.Tensor,
    scale: torch.Tensor | float | None = None,
    origins: torch.Tensor | None = None,
    oversampling: int = 2,
    interpolation: str = "linear",
) -> torch.Tensor:
    """Posterior weights of every grid rotation for every image (small grids; for diagnostics).

    Arguments as in :func:`oracle_denoise`; ``rotations`` is the grid, ``(M, 3, 3)`` or
    ``(B, M, 3, 3)``.

    Returns:
        ``(B, N, M)``, summing to 1 over ``M``.
    """
    spectrum = _spectrum(volume, oversampling, interpolation)
    grid = _grid(rotations, 0, noisy.shape[0], noisy)
    M = grid.shape[1]
    with _full_precision_matmul():
        feats, _, _ = _features(noisy, ctf, noise_variance, spectrum, grid, scale, origins, M)
        P = project_spectrum(spectrum, grid).flatten(-2)
        return torch.softmax(feats @ _rotation_features(P), dim=-1)


@torch.no_grad()
def oracle_denoise(
    noisy: torch.Tensor,
    ctf: torch.Tensor,
    noise_variance: torch.Tensor | float,
    volume: torch.Tensor | VolumeSpectrum,
    scale: torch.Tensor | float | None = None,
    rotations: torch.Tensor | None = None,
    n_rotations: int = 32768,
    origins: torch.Tensor | None = None,
    chunk: int = 1024,
    oversampling: int = 2,
    interpolation: str = "linear",
    return_details: bool = False,
) -> torch.Tensor | OracleResult:
    """Posterior mean of the clean CTF-affected images given the true volume.

    Args:
        noisy: ``(B, N, L, L)`` noisy images.
        ctf: ``(B, N, L, L)`` centred CTFs, RELION sign (ones when the CTF is off).
        noise_variance: ``(B,)`` or scalar per-pixel noise variance, in image units.
        volume: the true volumes ``(B, L, L, L)`` ``(z, y, x)``, or their :class:`VolumeSpectrum`.
        scale: ``(B,)`` or scalar amplitude ``s`` of the clean images relative to
            ``clean_images(volume, ...)`` (see :func:`fit_scale`); None estimates it per set by
            the method of moments (module docstring).
        rotations: the grid, ``(M, 3, 3)`` shared or ``(B, M, 3, 3)`` per set; None uses
            ``rotation_grid(n_rotations)``.
        n_rotations: approximate grid size when ``rotations`` is None (see the module
            docstring for how large it must be).
        origins: ``(B, N, 2)`` known RELION origins (pixels), or None for centred particles.
        chunk: grid rotations processed at once (memory ``~ B * chunk * 3 L^2`` floats).
        oversampling, interpolation: projector settings for a volume given in real space
            (default: the simulator's).
        return_details: return an :class:`OracleResult` instead of the images.
    Returns:
        ``(B, N, L, L)`` denoised images, or an :class:`OracleResult`.
    """
    B, N, L = noisy.shape[0], noisy.shape[1], noisy.shape[-1]
    spectrum = _spectrum(volume, oversampling, interpolation)
    grid = _grid(rotations, n_rotations, B, noisy)
    with _full_precision_matmul():
        feats, C, s = _features(noisy, ctf, noise_variance, spectrum, grid, scale, origins, chunk)
        # Running log-sum-exp over the chunks: log_norm is the running maximum, total the sum
        # of exp(logw - log_norm), acc the matching weighted sum of [Re, Im] of the slices.
        log_norm = noisy.new_full((B, N), -math.inf)
        total = noisy.new_zeros(B, N)
        acc = noisy.new_zeros(B, N, 2 * L * L)
        best = noisy.new_full((B, N), -math.inf)
        best_index = torch.zeros(B, N, dtype=torch.long, device=noisy.device)
        for start, P in _slices(spectrum, grid, chunk):
            logw = feats @ _rotation_features(P)  # (B, N, c)
            chunk_max, chunk_arg = logw.max(-1)
            improved = chunk_max > best
            best = torch.where(improved, chunk_max, best)
            best_index = torch.where(improved, chunk_arg + start, best_index)
            new_norm = torch.maximum(log_norm, chunk_max)
            decay = torch.exp(log_norm - new_norm)
            w = torch.exp(logw - new_norm[..., None])
            total = total * decay + w.sum(-1)
            acc = acc * decay[..., None] + w @ torch.cat([P.real, P.imag], dim=-1)
            log_norm = new_norm
    mean = torch.complex(acc[..., : L * L], acc[..., L * L :]) / total[..., None]
    spectra = (s[:, None, None] * C * mean).reshape(B, N, L, L)
    if origins is not None:
        spectra = translate_spectrum(spectra, -origins.to(noisy.dtype))
    denoised = ifft2c(spectra).real.to(noisy.dtype)
    if not return_details:
        return denoised
    best_rotation = torch.gather(grid, 1, best_index[..., None, None].expand(B, N, 3, 3))
    max_weight = torch.exp(best - log_norm) / total
    return OracleResult(denoised, best_rotation, max_weight, s)
