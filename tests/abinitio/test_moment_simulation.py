"""Simulated images and their moments (abinitio/moment_simulation.py)."""

from __future__ import annotations

import math

import pytest
import torch

from cryo_lightning.abinitio.image_moments import MomentLayout
from cryo_lightning.abinitio.moment_forward_model import MomentModel, slice_images
from cryo_lightning.abinitio.moment_simulation import MomentSimulator
from cryo_lightning.physics.ctf import CTFParams, ctf_2d
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.noise import signal_power
from cryo_lightning.physics.rotations import random_rotations
from cryo_lightning.physics.viewing_sh import SHViewingDistribution
from cryo_lightning.physics.volumes import random_molecule


class _FixedPoses:
    """A pose sampler that hands out given rotations in order."""

    def __init__(self, rotations: torch.Tensor) -> None:
        self.rotations, self.used = rotations, 0

    def sample(self, n: int, generator=None, dtype=torch.float64) -> torch.Tensor:
        out = self.rotations[self.used : self.used + n].to(dtype)
        self.used += n
        return out


def _setup(L: int = 16, l_max: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    basis = SphericalFourierBesselBasis(L, l_max=l_max)
    layout = MomentLayout(L, l_max)
    d = torch.tensor([12000.0, 25000.0], dtype=torch.float64)
    ctfs = ctf_2d(CTFParams(defocus_u=d, defocus_v=d, defocus_angle=0.0, voltage=300.0, cs=2.7,
                            amplitude_contrast=0.1), L, pixel_size=3.0)
    a = basis.expand(random_molecule(L, g, dtype=torch.float64))
    return basis, layout, ctfs, a, g


def test_images_equal_the_pixel_pipeline_at_the_drawn_poses():
    basis, layout, ctfs, a, g = _setup()
    rotations = random_rotations(7, generator=g, dtype=torch.float64)
    sim = MomentSimulator(basis, layout, ctfs, chunk=3)
    chunks = list(sim.images(a, _FixedPoses(rotations), 7, g))
    assert [c.shape[0] for c, _, _ in chunks] == [3, 3, 1]
    clean = torch.cat([c for c, _, _ in chunks])
    groups = torch.cat([gr for _, _, gr in chunks])
    assert groups.tolist() == [0, 1, 0, 1, 0, 1, 0]  # image i in group i mod G
    for i in range(7):
        reference = slice_images(basis, a, rotations[i : i + 1], ctfs[groups[i]])[0]
        torch.testing.assert_close(clean[i], reference, rtol=0, atol=1e-10 * float(reference.abs().max()))


def test_noise_level_and_debiased_moments_converge_to_the_model():
    basis, layout, ctfs, a, g = _setup()
    dist = SHViewingDistribution.random(2, generator=g)
    sim = MomentSimulator(basis, layout, ctfs, chunk=4000)
    std = sim.noise_std(a, dist, 0.5, g)
    clean = next(sim.images(a, dist, 4000, g))[0]
    assert std**2 * 0.5 == pytest.approx(float(signal_power(clean, dim=(-3,))), rel=0.05)
    noisy = next(sim.images(a, dist, 10, g, noise_std=std))[1]
    assert noisy is not None and noisy.shape == (10, 16, 16)

    with torch.no_grad():
        _, m2 = MomentModel(basis, layout, 2, ctfs=ctfs)(a, dist.coeffs)
    moments = sim.moments(a, dist, [4000, 64000], g, noise_std=std)

    def err(n: int) -> float:
        num = sum(float((x - y).abs().pow(2).sum()) for x, y in zip(moments[n].m2, m2))
        return math.sqrt(num / sum(float(y.abs().pow(2).sum()) for y in m2))

    assert moments[64000].noise_variance.tolist() == pytest.approx([std**2] * 2)
    assert err(64000) < 0.45 * err(4000)  # 1 / sqrt(16) = 0.25 expected
    assert err(64000) < 0.05


def test_sizes_must_fall_on_chunk_boundaries():
    basis, layout, ctfs, a, g = _setup()
    sim = MomentSimulator(basis, layout, ctfs, chunk=100)
    with pytest.raises(ValueError, match="multiples of chunk=100"):
        sim.moments(a, SHViewingDistribution.uniform(), [150, 300], g)
