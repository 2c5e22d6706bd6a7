"""Ab initio map from particle images by the method of moments (abinitio/moment_reconstruction.py)."""

from __future__ import annotations

import math

import torch

from cryo_lightning.abinitio.moment_forward_model import slice_images
from cryo_lightning.abinitio.moment_reconstruction import moments_reconstruct
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.noise import add_white_noise
from cryo_lightning.physics.viewing_sh import SHViewingDistribution
from cryo_lightning.physics.volumes import random_molecule


def test_moments_reconstruct_end_to_end():
    g = torch.Generator().manual_seed(3)
    L = 16
    basis = SphericalFourierBesselBasis(L, l_max=2, bandlimit=0.3)
    a = basis.expand(random_molecule(L, g, dtype=torch.float64))
    dist = SHViewingDistribution.random(2, generator=g, uniform_weight=0.3)
    clean = slice_images(basis, a, dist.sample(2000, generator=g, dtype=torch.float64))
    noisy, sigma2 = add_white_noise(clean, 1.0, generator=g, dim=(-3,))
    coeffs, distribution, volume, result = moments_reconstruct(
        noisy.float(), float(sigma2), l_max=2, bandlimit=0.3, view_degree=2, n_starts=1, iterations=(20, 100),
        generator=g)
    assert coeffs.shape == (basis.layout.count,)
    assert volume.shape == (L, L, L) and volume.dtype == torch.float32
    assert distribution.degree == 2
    assert math.isfinite(result.loss) and result.loss < 0.05
