"""Fourier-slice projection, its exact adjoint (backprojection), and in-plane shifts.

Convention (RELION, pinned by tests/physics/test_projection.py against ``relion_project``):
image ``i`` of volume ``V`` is ``P_i(x, y) = sum_z V(A_i^T (x, y, z))`` with vectors in
``(x, y, z)`` order and the rotation centre at index ``L // 2``. By the Fourier-slice theorem its
centred 2D DFT is ``V_hat(A_i^T (kx, ky, 0))``, which is what :func:`project_spectrum` samples.

Volumes are stored ``(z, y, x)``; images ``(y, x)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F

from cryo_lightning.physics.fourier import fft3c, frequency_grid, ifft2c

__all__ = [
    "VolumeSpectrum",
    "volume_spectrum",
    "project_spectrum",
    "project",
    "backproject",
    "insert_slices",
    "translate_spectrum",
    "project_real_space",
]

# Interpolation of the oversampled spectrum: grid_sample modes, or a separable Kaiser-Bessel
# window of width 4 samples (accurate to ~1e-3 at oversampling 2, where trilinear is ~3e-2).
_GRID_SAMPLE_MODES = {"linear": "bilinear", "nearest": "nearest"}
_INTERPOLATION = (*_GRID_SAMPLE_MODES, "kaiser_bessel")
_KB_WIDTH = 4


@dataclass
class VolumeSpectrum:
    """Oversampled, gridding-corrected 3D spectrum of a volume, ready for slicing.

    Attributes:
        data: ``(B, 2, Lp, Lp, Lp)`` float, real and imaginary parts as channels, ``(z, y, x)``.
        L: box size of the original volume (pixels).
        oversampling: ``Lp / L``.
        interpolation: ``"linear"`` (trilinear), ``"nearest"`` or ``"kaiser_bessel"``.
    """

    data: torch.Tensor
    L: int
    oversampling: int
    interpolation: str

    @property
    def padded_size(self) -> int:
        return self.data.shape[-1]


def _kb_beta(oversampling: int) -> float:
    # Beatty, Nishimura & Pauly (2005), IEEE TMI 24:799, eq. 5: near-optimal shape parameter.
    os_ = float(oversampling)
    return math.pi * math.sqrt((_KB_WIDTH / os_) ** 2 * (os_ - 0.5) ** 2 - 0.8)


def _kaiser_bessel(d: torch.Tensor, beta: float) -> torch.Tensor:
    """Kaiser-Bessel window of width ``_KB_WIDTH`` samples at offsets ``d`` (grid units)."""
    x = (2.0 * d / _KB_WIDTH).clamp(-1.0, 1.0)
    return torch.special.i0(beta * torch.sqrt(1.0 - x * x)) / torch.special.i0(torch.tensor(beta))


def _kernel_transform(Lp: int, interpolation: str, oversampling: int, device, dtype) -> torch.Tensor:
    """Fourier transform ``K(x)`` of the 1D interpolation kernel at real-space offsets ``x`` (pixels).

    Interpolating a spectrum sampled every ``1 / Lp`` cycles/pixel with kernel ``k`` multiplies
    the volume by ``K(x) = integral k(d) exp(-2 pi i d x / Lp) dd`` per axis: trilinear gives
    ``sinc^2(x / Lp)``, nearest ``sinc(x / Lp)``; the Kaiser-Bessel transform is integrated
    numerically. Returns ``(Lp,)``.
    """
    x = (torch.arange(Lp, device=device, dtype=torch.float64) - Lp // 2) / Lp
    if interpolation in _GRID_SAMPLE_MODES:
        k = torch.sinc(x)
        k = k * k if interpolation == "linear" else k
    else:
        d = torch.linspace(-_KB_WIDTH / 2, _KB_WIDTH / 2, 2001, device=device, dtype=torch.float64)
        w = _kaiser_bessel(d, _kb_beta(oversampling))
        k = torch.trapezoid(w[None, :] * torch.cos(2 * math.pi * d[None, :] * x[:, None]), d, dim=1)
    return k.to(dtype)


def _gridding_correction(Lp: int, interpolation: str, oversampling: int, device, dtype) -> torch.Tensor:
    """Real-space weight ``1 / (K(x) K(y) K(z))`` that undoes the kernel's apodisation.

    Dividing the padded volume by it first makes the interpolated slices those of the original
    volume, up to aliasing. Returns ``(Lp, Lp, Lp)``.
    """
    k = _kernel_transform(Lp, interpolation, oversampling, device, dtype)
    return 1.0 / (k[:, None, None] * k[None, :, None] * k[None, None, :])


def volume_spectrum(
    volume: torch.Tensor, oversampling: int = 2, interpolation: str = "kaiser_bessel"
) -> VolumeSpectrum:
    """Zero-pad a volume by ``oversampling``, apply the gridding correction and take its centred FFT.

    Compute once per volume, then slice many times with :func:`project_spectrum`.

    Args:
        volume: ``(L, L, L)`` or ``(B, L, L, L)`` real, ``(z, y, x)``.
        oversampling: integer zero-padding factor (2 is a good default; 1 is fastest).
        interpolation: ``"linear"`` (fast, relative error ~3e-2 at oversampling 2 for an object
            filling the box), ``"kaiser_bessel"`` (64-tap window, ~1e-3) or ``"nearest"``.
    """
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
    if volume.ndim == 3:
        volume = volume[None]
    L = volume.shape[-1]
    Lp = int(oversampling) * L
    padded = volume.new_zeros(volume.shape[:-3] + (Lp, Lp, Lp))
    s = Lp // 2 - L // 2
    padded[..., s : s + L, s : s + L, s : s + L] = volume
    padded = padded * _gridding_correction(Lp, interpolation, int(oversampling), volume.device, volume.dtype)
    spec = torch.view_as_real(fft3c(padded))  # (B, Lp, Lp, Lp, 2)
    return VolumeSpectrum(spec.movedim(-1, 1).contiguous(), L, int(oversampling), interpolation)


def _slice_index(rotations: torch.Tensor, L: int, Lp: int) -> torch.Tensor:
    """Padded-grid index coordinates of the central slices: ``(B, N, L, L, 3)``, ``(x, y, z)``."""
    ky, kx = frequency_grid(L, 2, device=rotations.device, dtype=rotations.dtype)
    k2 = torch.stack([kx, ky, torch.zeros_like(kx)], dim=-1)  # (L, L, 3) cycles/pixel
    # q = A^T k for every pixel: q_j = sum_i A_ij k_i.
    q = torch.einsum("bnij,yxi->bnyxj", rotations, k2)
    return q * Lp + Lp // 2


def _sample_kaiser_bessel(data: torch.Tensor, index: torch.Tensor, oversampling: int) -> torch.Tensor:
    """Separable Kaiser-Bessel interpolation of ``data (B, C, Lp, Lp, Lp)`` at ``index (B, ..., 3)``.

    Returns ``(B, C, ...)``; samples whose window leaves the grid get zero weight there.
    """
    B, C, Lp = data.shape[0], data.shape[1], data.shape[-1]
    beta = _kb_beta(oversampling)
    flat = torch.complex(data[:, 0], data[:, 1]).reshape(B, Lp**3)  # one gather per tap, not two
    pts = index.reshape(B, -1, 3)
    base = torch.floor(pts) - (_KB_WIDTH // 2 - 1)  # first tap per axis
    taps = []  # per axis: (integer positions, weights), each (B, M, W)
    for axis in range(3):
        pos = base[..., axis, None] + torch.arange(_KB_WIDTH, device=data.device, dtype=pts.dtype)
        w = _kaiser_bessel(pos - pts[..., axis, None], beta)
        w = torch.where((pos >= 0) & (pos <= Lp - 1), w, torch.zeros_like(w))
        taps.append((pos.clamp(0, Lp - 1).long(), w))
    (ix, wx), (iy, wy), (iz, wz) = taps
    out = flat.new_zeros(B, pts.shape[1])
    for a in range(_KB_WIDTH):
        for b in range(_KB_WIDTH):
            row = iz[..., a] * (Lp * Lp) + iy[..., b] * Lp  # (B, M)
            wzy = wz[..., a] * wy[..., b]
            for c in range(_KB_WIDTH):
                out = out + torch.gather(flat, 1, row + ix[..., c]) * (wzy * wx[..., c])
    out = torch.stack([out.real, out.imag], dim=1)
    return out.reshape((B, C) + index.shape[1:-1])


def project_spectrum(
    spectrum: VolumeSpectrum, rotations: torch.Tensor, max_radius: float | None = 0.5
) -> torch.Tensor:
    """Central slices of a volume spectrum: the centred 2D DFTs of the projections.

    Args:
        spectrum: from :func:`volume_spectrum`, batch ``B``.
        rotations: ``(N, 3, 3)`` (for ``B == 1``) or ``(B, N, 3, 3)`` RELION matrices ``A``.
        max_radius: frequencies beyond this radius (cycles/pixel) are set to zero, as RELION's
            projector does beyond Nyquist; ``None`` keeps the corners.
    Returns:
        ``(B, N, L, L)`` complex (``(N, L, L)`` if rotations had no batch axis).
    """
    squeeze = rotations.ndim == 3
    if squeeze:
        rotations = rotations[None]
    B = spectrum.data.shape[0]
    if rotations.shape[0] != B:
        raise ValueError(f"{rotations.shape[0]} rotation sets for {B} volumes")
    L, Lp = spectrum.L, spectrum.padded_size
    index = _slice_index(rotations.to(spectrum.data.dtype), L, Lp)
    if spectrum.interpolation == "kaiser_bessel":
        out = _sample_kaiser_bessel(spectrum.data, index, spectrum.oversampling)
    else:
        grid = 2.0 * index / (Lp - 1) - 1.0  # align_corners=True normalisation
        out = F.grid_sample(
            spectrum.data, grid, mode=_GRID_SAMPLE_MODES[spectrum.interpolation],
            padding_mode="zeros", align_corners=True,
        )  # (B, 2, N, L, L)
    out = torch.complex(out[:, 0], out[:, 1])
    if max_radius is not None:
        ky, kx = frequency_grid(L, 2, device=out.device, dtype=spectrum.data.dtype)
        out = out * (kx * kx + ky * ky <= max_radius**2)
    return out[0] if squeeze else out


def project(
    volume: torch.Tensor,
    rotations: torch.Tensor,
    oversampling: int = 2,
    interpolation: str = "kaiser_bessel",
    max_radius: float | None = 0.5,
) -> torch.Tensor:
    """Projections of a volume by the Fourier-slice theorem.

    Args:
        volume: ``(L, L, L)`` or ``(B, L, L, L)`` real, ``(z, y, x)``.
        rotations: ``(N, 3, 3)`` or ``(B, N, 3, 3)`` RELION matrices.
    Returns:
        ``(N, L, L)`` or ``(B, N, L, L)`` real images ``(y, x)``, in the volume's units times pixels
        (a sum along z).
    """
    spec = volume_spectrum(volume, oversampling, interpolation)
    return ifft2c(project_spectrum(spec, rotations, max_radius)).real


def backproject(
    images: torch.Tensor,
    rotations: torch.Tensor,
    oversampling: int = 2,
    interpolation: str = "kaiser_bessel",
    max_radius: float | None = 0.5,
) -> torch.Tensor:
    """Exact adjoint of :func:`project` (same arguments): ``<P x, y> = <x, P^T y>``.

    Computed as the vector-Jacobian product of the linear map :func:`project`, so it is the
    transpose of exactly the discretisation used forward (interpolation, oversampling,
    gridding correction and radius mask included).

    Args:
        images: ``(N, L, L)`` or ``(B, N, L, L)`` real.
        rotations: ``(N, 3, 3)`` or ``(B, N, 3, 3)``.
    Returns:
        ``(L, L, L)`` or ``(B, L, L, L)`` real.
    """
    L = images.shape[-1]
    shape = (L, L, L) if rotations.ndim == 3 else (rotations.shape[0], L, L, L)
    zero = images.new_zeros(shape)

    def forward(v: torch.Tensor) -> torch.Tensor:
        return project(v, rotations, oversampling, interpolation, max_radius)

    _, vjp = torch.func.vjp(forward, zero)
    return vjp(images)[0]


def insert_slices(slices: torch.Tensor, rotations: torch.Tensor, L: int, oversampling: int = 2,
                  band: torch.Tensor | None = None) -> torch.Tensor:
    """Adjoint of trilinear slicing of a raw padded spectrum: Fourier-space back-projection.

    RELION's back-projector: each slice sample is spread onto the 8 neighbouring voxels of the
    ``oversampling``-times padded 3D grid with the trilinear weights that
    :func:`project_spectrum` (``interpolation="linear"``) reads them with. Inserting the data and,
    separately, the CTF^2 weights and dividing gives the direct Fourier inversion.

    Args:
        slices: ``(C, M, L, L)`` real channels per slice (e.g. Re, Im of the data and the weights),
            centred layout.
        rotations: ``(M, 3, 3)`` RELION matrices.
        L: box size.
        band: ``(L, L)`` bool, the slice pixels to insert (the others are taken as zero and cost
            nothing); None inserts all.
    Returns:
        ``(C, Lp, Lp, Lp)`` with ``Lp = oversampling L``, ``(z, y, x)``, centre at ``Lp // 2``.
    """
    C, M = slices.shape[:2]
    Lp = int(oversampling) * L
    index = _slice_index(rotations[None].to(slices.dtype), L, Lp)  # (1, M, L, L, 3)
    values = slices.reshape(C, M, L * L)
    index = index.reshape(1, M, L * L, 3)
    if band is not None:
        keep = band.flatten().nonzero().squeeze(1)
        values, index = values[:, :, keep], index[:, :, keep]
    grid = (2.0 * index / (Lp - 1) - 1.0)[:, :, :, None]  # as project_spectrum normalises it
    # The adjoint of grid_sample is its input gradient; calling the backward kernel directly
    # skips the forward pass that autograd would run first.
    shape = slices.new_empty(1, C, Lp, Lp, Lp).expand(1, C, Lp, Lp, Lp)
    grad, _ = torch.ops.aten.grid_sampler_3d_backward(
        values[None, ..., None].contiguous(), shape, grid, 0, 0, True, [True, False])
    return grad[0]


def translate_spectrum(spectra: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Translate images, given as centred spectra, by ``shifts`` pixels: ``Y(r) = X(r - t)``.

    A RELION origin ``o`` (``rlnOriginX/Y`` in pixels) places the particle centre at
    ``box centre - o``, so the forward model of a RELION image uses ``shifts = -o``.

    Args:
        spectra: ``(..., L, L)`` complex, centred layout.
        shifts: ``(..., 2)`` pixels in ``(x, y)`` order; any sub-pixel value.
    Returns:
        ``(..., L, L)`` complex.
    """
    L = spectra.shape[-1]
    ky, kx = frequency_grid(L, 2, device=spectra.device, dtype=shifts.dtype)
    phase = kx * shifts[..., 0, None, None] + ky * shifts[..., 1, None, None]
    return spectra * torch.polar(torch.ones_like(phase), -2.0 * torch.pi * phase)


def project_real_space(volume: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Slow reference projector: rotate the sampling grid, trilinear interpolation, sum over z.

    For tests only (``O(N L^3)`` memory and time).

    Args:
        volume: ``(L, L, L)`` real, ``(z, y, x)``.
        rotations: ``(N, 3, 3)`` RELION matrices.
    Returns:
        ``(N, L, L)`` real.
    """
    L = volume.shape[-1]
    c = torch.arange(L, device=volume.device, dtype=volume.dtype) - L // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    r = torch.stack([x, y, z], dim=-1)  # (L, L, L, 3), (x, y, z) components, (z, y, x) layout
    u = torch.einsum("nij,zyxi->nzyxj", rotations.to(volume.dtype), r)  # A^T r
    grid = 2.0 * (u + L // 2) / (L - 1) - 1.0
    vol = volume[None, None].expand(rotations.shape[0], 1, L, L, L)
    sampled = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return sampled[:, 0].sum(dim=1)  # sum over z
