"""Projector conventions against RELION's own projections, a real-space reference and its adjoint."""

from __future__ import annotations

import math

import mrcfile
import pytest
import starfile
import torch

from cryo_lightning.physics.fourier import fourier_resize, ifft2c
from cryo_lightning.physics.projection import (
    VolumeSpectrum,
    backproject,
    insert_slices,
    project,
    project_real_space,
    project_spectrum,
    translate_spectrum,
    volume_spectrum,
)
from cryo_lightning.physics.rotations import euler_to_matrix, random_rotations
from cryo_lightning.physics.volumes import random_molecule


def ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation per image, ``(N, L, L)`` -> ``(N,)``."""
    a = a - a.mean(dim=(-1, -2), keepdim=True)
    b = b - b.mean(dim=(-1, -2), keepdim=True)
    return (a * b).sum((-1, -2)) / (a.norm(dim=(-1, -2)) * b.norm(dim=(-1, -2)))


def _relion_case(shared_data, L: int, kind: str):
    folder = shared_data / "real" / "ASPIRE-Python"
    vol = torch.from_numpy(mrcfile.open(folder / "clean70SRibosome_vol_65p.mrc", permissive=True).data.copy())
    if L == 64:
        vol = fourier_resize(vol, 64, 3)
    particles = starfile.read(folder / f"rln_proj_{L}{kind}.star", always_dict=True)["particles"]
    with mrcfile.open(folder / f"rln_proj_{L}{kind}.mrcs", permissive=True) as f:
        images = torch.from_numpy(f.data.copy())
    angles = torch.tensor(particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(), dtype=torch.float32)
    if "rlnOriginX" in particles:  # pixels; the _centered files also carry zero Angstrom origins
        origins = torch.tensor(particles[["rlnOriginX", "rlnOriginY"]].to_numpy(), dtype=torch.float32)
    else:
        origins = torch.tensor(particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(), dtype=torch.float32)
    return vol, euler_to_matrix(angles), origins, images


def _relion_forward(vol, rotations, origins, extra_shift=(0.0, 0.0)):
    spectra = project_spectrum(volume_spectrum(vol), rotations)
    shifts = -origins + torch.tensor(extra_shift)  # particle centre at box centre - origin
    return ifft2c(translate_spectrum(spectra, shifts)).real


@pytest.mark.parametrize("kind", ["_centered", "_shifted"])
def test_matches_relion_project_even_box(shared_data, kind):
    vol, rotations, origins, images = _relion_case(shared_data, 64, kind)
    if kind == "_shifted":
        assert origins.abs().max() >= 10  # the fixture really is shifted
    corr = ncc(_relion_forward(vol, rotations, origins), images)
    assert corr.min() >= 0.99, corr


@pytest.mark.parametrize("kind", ["", "_centered", "_shifted"])
def test_odd_box_relion_offset_is_one_pixel(shared_data, kind):
    """relion_project's odd-box images are centred at L // 2 + 1 (docs/conventions.md)."""
    vol, rotations, origins, images = _relion_case(shared_data, 65, kind)
    matched = ncc(_relion_forward(vol, rotations, origins, extra_shift=(1.0, 1.0)), images)
    unshifted = ncc(_relion_forward(vol, rotations, origins), images)
    assert matched.min() >= 0.99, matched
    assert unshifted.max() < 0.95, unshifted


def test_even_box_plain_fixture_volume_half_voxel_offset(shared_data):
    """rln_proj_64 was made from a 64^3 map centred half a voxel lower (ASPIRE's downsampling).

    Shifting the volume by -0.5 voxel on every axis (a 2D shift A (-0.5, -0.5, -0.5)) matches.
    """
    vol, rotations, origins, images = _relion_case(shared_data, 64, "")
    spectra = project_spectrum(volume_spectrum(vol), rotations)
    shift3d = torch.full((3,), -0.5)
    shifts = (rotations @ shift3d)[:, :2]
    corr = ncc(ifft2c(translate_spectrum(spectra, shifts)).real, images)
    assert corr.min() >= 0.99, corr


def _smooth_volume(L: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, list]:
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(L, dtype=dtype) - L // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(L, L, L, dtype=dtype)
    blobs = []
    for _ in range(30):
        centre = (torch.rand(3, generator=g, dtype=dtype) - 0.5) * L * 0.5
        sigma = float(2 + 2 * torch.rand(1, generator=g, dtype=dtype))
        blobs.append((centre, sigma))
        vol += torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / (2 * sigma**2))
    return vol, blobs


def test_fourier_slice_matches_real_space_projector():
    L = 64
    vol, _ = _smooth_volume(L, seed=0)
    rotations = random_rotations(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = project_real_space(vol, rotations)
    fourier = project(vol, rotations)
    rel = float((fourier - reference).norm() / reference.norm())
    assert rel <= 1e-2, rel


def test_fourier_slice_matches_analytic_gaussian_projections():
    """A 3D Gaussian projects to a 2D Gaussian of the same width at A c (closed form)."""
    L = 64  # the blobs must lie well inside the box for the closed form to hold
    vol, blobs = _smooth_volume(L, seed=3)
    rotations = random_rotations(4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    c = torch.arange(L, dtype=torch.float64) - L // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    expected = torch.zeros(4, L, L, dtype=torch.float64)
    for centre, sigma in blobs:
        p = rotations @ centre  # image-plane position of the blob centre, (x, y, z)
        r2 = (xx - p[:, 0, None, None]) ** 2 + (yy - p[:, 1, None, None]) ** 2
        expected += math.sqrt(2 * math.pi) * sigma * torch.exp(-r2 / (2 * sigma**2))
    for interpolation, tol in [("kaiser_bessel", 3e-3), ("linear", 6e-2)]:
        got = project(vol, rotations, interpolation=interpolation)
        rel = float((got - expected).norm() / expected.norm())
        assert rel <= tol, (interpolation, rel)


@pytest.mark.parametrize("interpolation", ["kaiser_bessel", "linear", "nearest"])
def test_backprojection_is_exact_adjoint(interpolation):
    L = 24
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, L, L, L, generator=g, dtype=torch.float64)
    y = torch.randn(2, 5, L, L, generator=g, dtype=torch.float64)
    rotations = random_rotations(10, generator=g, dtype=torch.float64).reshape(2, 5, 3, 3)
    px = project(x, rotations, interpolation=interpolation)
    pty = backproject(y, rotations, interpolation=interpolation)
    gap = float(((px * y).sum() - (x * pty).sum()).abs())
    assert gap <= 1e-5 * float(px.norm() * y.norm())


def test_identity_projection_is_sum_along_z():
    vol, _ = _smooth_volume(32, seed=5)
    got = project(vol, torch.eye(3, dtype=torch.float64)[None])[0]
    torch.testing.assert_close(got, vol.sum(0), rtol=0, atol=2e-3 * float(vol.sum(0).abs().max()))


def test_integer_translation_equals_roll():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 16, 16, generator=g, dtype=torch.float64)
    spectra = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(img, dim=(-2, -1))), dim=(-2, -1))
    shifts = torch.tensor([[2.0, -3.0]] * 3, dtype=torch.float64)  # (x, y)
    moved = ifft2c(translate_spectrum(spectra, shifts)).real
    torch.testing.assert_close(moved, torch.roll(img, shifts=(-3, 2), dims=(-2, -1)))


def test_insert_slices_inverts_slicing_where_the_slices_are_dense():
    """Direct Fourier inversion: inserting noise-free slices and their unit weights and dividing
    gives back the padded spectrum they were cut from (trilinear smoothing aside)."""
    L = 16
    volume = random_molecule(L, torch.Generator().manual_seed(3))
    spectrum = volume_spectrum(volume, 2, "linear")
    rotations = random_rotations(3000, generator=torch.Generator().manual_seed(0))
    slices = project_spectrum(spectrum, rotations)
    inside = (slices.abs() > 0).to(slices.real.dtype)
    grid = insert_slices(torch.stack([slices.real, slices.imag, inside]), rotations, L)
    assert grid.shape == (3, 2 * L, 2 * L, 2 * L)
    truth = torch.complex(spectrum.data[0, 0], spectrum.data[0, 1])
    q = torch.arange(2 * L) - L
    radius = torch.sqrt(q[:, None, None] ** 2 + q[None, :, None] ** 2 + q[None, None, :] ** 2)
    dense = radius < 0.8 * L  # within 0.4 cycles/pixel
    estimate = torch.complex(grid[0], grid[1])[dense] / grid[2][dense]
    error = float((estimate - truth[dense]).norm() / truth[dense].norm())
    # trilinear interpolation is accurate to ~3e-2 per pass (volume_spectrum's docstring); slicing
    # then inserting is two passes: 0.087 measured, the same at 20000 slices (not a density gap)
    assert error < 0.1, error
    gain = (estimate * truth[dense].conj()).sum().real / truth[dense].abs().square().sum()
    assert 0.95 < float(gain) < 1.0, gain
    # the weights count the samples: each spreads a total weight of one (a few at Nyquist fall
    # partly off the padded grid's last plane)
    assert 0.98 < float(grid[2].sum()) / float(inside.sum()) <= 1.0


def test_insert_slices_band_equals_zeroing_the_other_pixels():
    L = 12
    g = torch.Generator().manual_seed(0)
    rotations = random_rotations(20, generator=g)
    slices = torch.randn(2, 20, L, L, generator=g)
    yy, xx = torch.meshgrid(torch.arange(L) - L // 2, torch.arange(L) - L // 2, indexing="ij")
    band = xx**2 + yy**2 <= 16
    full = insert_slices(slices * band, rotations, L)
    assert torch.allclose(insert_slices(slices, rotations, L, band=band), full, atol=1e-5)
    # it is the adjoint of trilinear slicing: <slice(V), s> = <V, insert(s)>
    volume = torch.randn(2, 2 * L, 2 * L, 2 * L, generator=g)
    spec = VolumeSpectrum(volume[None], L, 2, "linear")
    sampled = project_spectrum(spec, rotations, max_radius=None)  # (M, L, L) complex: channels 0, 1
    lhs = (sampled.real * slices[0]).sum() + (sampled.imag * slices[1]).sum()
    rhs = (volume * insert_slices(slices, rotations, L)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-4)
