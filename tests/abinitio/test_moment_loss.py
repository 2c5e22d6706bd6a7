"""The moment loss (abinitio/moment_loss.py): zero at the truth, and its expected value from sampling errors."""

from __future__ import annotations

import torch

from cryo_lightning.abinitio.image_moments import MomentLayout
from cryo_lightning.abinitio.moment_forward_model import MomentModel
from cryo_lightning.abinitio.moment_loss import expected_misfit, moment_loss
from cryo_lightning.abinitio.moment_simulation import MomentSimulator
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.viewing_sh import SHViewingDistribution
from cryo_lightning.physics.volumes import random_molecule
from tests.abinitio.conftest import exact_moment_problem


def test_loss_is_zero_at_the_truth_and_positive_elsewhere():
    basis, model, a, dist, target, _ = exact_moment_problem()
    assert float(moment_loss(model, a, dist.coeffs, target)) < 1e-28
    assert float(moment_loss(model, 1.1 * a, dist.coeffs, target)) > 1e-3


def test_expected_misfit_is_the_loss_at_the_truth():
    """Moments of N noisy images: the loss of the true (a, b) averages to expected_misfit; exact moments give 0."""
    g = torch.Generator().manual_seed(3)
    L, l_max = 16, 2
    basis = SphericalFourierBesselBasis(L, l_max=l_max, bandlimit=0.4)
    layout = MomentLayout(L, l_max, bandlimit=0.4)
    model = MomentModel(basis, layout, 2, third=True)
    a = basis.expand(random_molecule(L, g, dtype=torch.float64))
    dist = SHViewingDistribution.random(2, generator=g)
    sim = MomentSimulator(basis, layout, chunk=500)
    std = sim.noise_std(a, dist, 0.1, g)
    ratios = []
    for _ in range(6):
        target = sim.moments(a, dist, 500, g, noise_std=std, third=True)[500]
        with torch.no_grad():
            at_truth = float(moment_loss(model, a, dist.coeffs, target, use_m3=True))
        ratios.append(at_truth / expected_misfit(target, use_m3=True))
    assert 0.7 < sum(ratios) / len(ratios) < 1.3, ratios
    _, _, _, _, exact, _ = exact_moment_problem()
    assert expected_misfit(exact) == 0.0
