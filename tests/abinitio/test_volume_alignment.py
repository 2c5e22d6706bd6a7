"""O(3) alignment of SFB coefficient vectors (abinitio/volume_alignment.py)."""

from __future__ import annotations

import torch

from cryo_lightning.abinitio.volume_alignment import (
    align_volumes,
    aligned_fsc,
    relative_error,
    transform_coefficients,
    transform_viewing,
)
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.rotations import random_rotations
from cryo_lightning.physics.viewing_sh import SHViewingDistribution
from cryo_lightning.physics.volumes import random_molecule


def _molecule(L: int = 16, l_max: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    basis = SphericalFourierBesselBasis(L, l_max=l_max)
    return basis, basis.expand(random_molecule(L, g, dtype=torch.float64)), g


def test_recovers_known_rotation_and_mirror():
    basis, a, g = _molecule()
    R = random_rotations(1, generator=g, dtype=torch.float64)[0]
    for reflected in (False, True):
        moved = transform_coefficients(basis, a, R, reflected)
        assert relative_error(a, moved) > 0.3
        result = align_volumes(basis, a, moved, n_grid=2000)
        assert result.reflected == reflected
        assert result.relative_error < 1e-6
        torch.testing.assert_close(result.aligned, a, atol=1e-6 * float(a.abs().max()), rtol=0)


def test_noisy_estimate_error_is_the_noise_level():
    basis, a, g = _molecule(seed=1)
    noise = torch.randn(a.shape, generator=g, dtype=torch.float64)
    noisy = a + 0.1 * float(a.norm()) * noise / float(noise.norm())
    R = random_rotations(1, generator=g, dtype=torch.float64)[0]
    result = align_volumes(basis, a, transform_coefficients(basis, noisy, R, True), n_grid=2000)
    assert result.reflected
    assert 0.09 < result.relative_error <= relative_error(a, noisy) + 1e-9


def test_viewing_transform_matches_volume_transform():
    """rho'(v) = rho(R^T v) for a rotation and rho'(v) = rho(J v) for the mirror, like the volume."""
    g = torch.Generator().manual_seed(2)
    dist = SHViewingDistribution.random(4, generator=g)
    R = random_rotations(1, generator=g, dtype=torch.float64)[0]
    v = torch.randn(50, 3, generator=g, dtype=torch.float64)
    v = v / v.norm(dim=-1, keepdim=True)
    rotated = SHViewingDistribution(transform_viewing(dist.coeffs, 4, R), 4)
    torch.testing.assert_close(rotated.density(v), dist.density(v @ R))  # rows: R^T v
    mirrored = SHViewingDistribution(transform_viewing(dist.coeffs, 4, torch.eye(3, dtype=torch.float64), True), 4)
    j = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(mirrored.density(v), dist.density(v * j))


def test_mirror_of_volume_is_z_flip_of_the_map():
    basis, a, _ = _molecule(l_max=3)
    flipped = basis.evaluate(transform_coefficients(basis, a, torch.eye(3, dtype=torch.float64), True))
    vol = basis.evaluate(a)
    # z -> -z about index L // 2: index i -> (L - i) mod L along the first axis
    torch.testing.assert_close(flipped, torch.roll(torch.flip(vol, [0]), 1, 0), atol=1e-9, rtol=0)


def test_aligned_fsc_is_one_for_identical_maps():
    basis, a, _ = _molecule(l_max=3)
    curve = aligned_fsc(basis, a, a)
    assert curve.shape == (9,)
    torch.testing.assert_close(curve[1:6], torch.ones(5, dtype=torch.float64))
