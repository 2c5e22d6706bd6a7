"""Shared pieces of the method-of-moments tests."""

from __future__ import annotations

import torch

from cryo_lightning.abinitio.image_moments import ImageMoments, MomentLayout
from cryo_lightning.abinitio.moment_forward_model import MomentModel
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.viewing_sh import SHViewingDistribution
from cryo_lightning.physics.volumes import random_molecule


def exact_moment_problem(L: int = 16, l_max: int = 2, degree: int = 2, seed: int = 0):
    """Basis, model, true ``a`` and distribution, their exact moments (one group, no noise) and the generator."""
    g = torch.Generator().manual_seed(seed)
    basis = SphericalFourierBesselBasis(L, l_max=l_max)
    layout = MomentLayout(L, l_max)
    model = MomentModel(basis, layout, degree)
    a = basis.expand(random_molecule(L, g, dtype=torch.float64))
    dist = SHViewingDistribution.random(degree, generator=g, uniform_weight=0.3)
    with torch.no_grad():
        m1, m2 = model(a, dist.coeffs)
    one = torch.ones(1, dtype=torch.float64)
    return basis, model, a, dist, ImageMoments(m1, m2, one, 0 * one), g
