"""Classical method-of-moments solver (abinitio/moment_solver.py).

From exact moments the solver reaches moment residuals near zero from random starts. The
aligned coefficient error is *not* asserted to be small: with in-plane-uniform, even viewing
distributions M1 + M2 leave continuous ambiguities beyond O(3) (see the benchmark's
identifiability table), so a moment-consistent fit need not be the molecule.
"""

from __future__ import annotations

import math

import pytest
import torch

from cryo_lightning.abinitio.image_moments import ImageMoments, MomentLayout
from cryo_lightning.abinitio.moment_forward_model import MomentModel
from cryo_lightning.abinitio.moment_loss import moment_loss, whitening_scales
from cryo_lightning.abinitio.moment_solver import fit_moments, hop_blocks, newton_polish
from cryo_lightning.abinitio.volume_alignment import align_volumes
from cryo_lightning.models.coefficient_prior import CoefficientPrior
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.viewing_sh import SHViewingDistribution
from cryo_lightning.physics.volumes import random_molecule
from tests.abinitio.conftest import exact_moment_problem


def test_fit_reaches_moment_consistency_from_random_starts():
    basis, model, a, dist, target, _ = exact_moment_problem()
    result = fit_moments(model, target, n_starts=2, iterations=(30, 300), generator=torch.Generator().manual_seed(1))
    assert result.loss < 1e-6
    assert len(result.losses) == 2 and result.loss == min(result.losses)
    assert float(result.view_coeffs[0]) == 1.0
    assert result.distribution.bounds()[0] > -0.05  # positivity penalty keeps rho ~ non-negative
    assert math.isfinite(align_volumes(basis, a, result.coeffs, n_grid=500).relative_error)


def test_fit_started_at_the_truth_stays_there():
    basis, model, a, dist, target, g = exact_moment_problem(seed=2)
    result = fit_moments(model, target, n_starts=1, iterations=(0, 50), init=(a, dist.coeffs))
    assert result.loss < 1e-20
    assert align_volumes(basis, a, result.coeffs, n_grid=200).relative_error < 1e-6


def test_hop_blocks_cover_the_odd_degrees_then_each_degree():
    layout = SphericalFourierBesselBasis(16, l_max=4).layout
    blocks = dict(hop_blocks(layout))
    degree = layout.lsm()[:, 0]
    assert list(blocks) == ["odd", "l=1", "l=2", "l=3", "l=4"]
    assert torch.equal(blocks["odd"], (degree == 1) | (degree == 3))
    for l in range(1, 5):
        assert int(blocks[f"l={l}"].sum()) == layout.radial_counts[l] * (2 * l + 1)
    assert [name for name, _ in hop_blocks(SphericalFourierBesselBasis(16, l_max=2).layout)] == ["l=1", "l=2"]


def test_basin_hops_only_keep_improvements_and_report_the_returned_state():
    g = torch.Generator().manual_seed(0)
    L, l_max = 16, 3
    basis = SphericalFourierBesselBasis(L, l_max=l_max)
    model = MomentModel(basis, MomentLayout(L, l_max), 4, third=True)
    a = basis.expand(random_molecule(L, g, dtype=torch.float64))
    dist = SHViewingDistribution.random(4, generator=g)
    with torch.no_grad():
        m1, m2, m3 = model.with_third(a, dist.coeffs)
    one = torch.ones(1, dtype=torch.float64)
    target = ImageMoments(m1, m2, one, 0 * one, m3)
    odd = dict(hop_blocks(basis.layout))["odd"]
    start = a.clone()
    start[odd] = torch.randn(int(odd.sum()), generator=g, dtype=torch.float64) * a[odd].norm() / odd.sum().sqrt()
    kwargs = dict(n_starts=1, iterations=(0, 0, 40), init=(start, dist.coeffs), whiten=True, hop_iterations=40)
    plain = fit_moments(model, target, **kwargs)
    hopped = fit_moments(model, target, hops=1, generator=torch.Generator().manual_seed(7), **kwargs)
    assert plain.hops_accepted == 0 and plain.hop_losses == []
    assert len(hopped.hop_losses) == 1
    assert hopped.loss <= plain.loss
    assert hopped.loss == min([plain.loss] + hopped.hop_losses)  # the same staged fit, then the best hop
    again = float(moment_loss(model, hopped.coeffs, hopped.view_coeffs, target, use_m3=True,
                              scales=whitening_scales(target)))
    assert again == pytest.approx(hopped.loss, rel=1e-9)
    # the first hop redraws the odd degrees (the corrupted block) and lands lower: it is kept
    assert hopped.hops_accepted == 1 and hopped.loss < plain.loss


def test_prior_turns_the_fit_into_a_map_estimate():
    """With a prior the fit trades misfit for prior energy, more so the larger its weight; the loss includes it."""
    basis, model, a, dist, target, g = exact_moment_problem(seed=4)
    bank = torch.stack([basis.expand(random_molecule(16, g, dtype=torch.float64)) for _ in range(24)])
    prior = CoefficientPrior(basis.layout.irreps()).fit(bank)
    kwargs = dict(n_starts=1, iterations=(0, 60), init=(a, dist.coeffs))
    fits = [fit_moments(model, target, prior=prior.energy, prior_weight=w, **kwargs) for w in (0.0, 1e-3, 1e-1)]
    energies = [float(prior.energy(f.coeffs)) for f in fits]
    misfits = [float(moment_loss(model, f.coeffs, f.view_coeffs, target)) for f in fits]
    assert energies[2] < energies[1] < energies[0]
    assert misfits[0] < 1e-20 < misfits[1] < misfits[2]
    assert fits[1].loss == pytest.approx(misfits[1] + 1e-3 * energies[1], rel=1e-9)


def test_newton_polish_reaches_the_rosenbrock_minimum():
    def rosenbrock(x: torch.Tensor) -> torch.Tensor:
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    x, loss, evaluations = newton_polish(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), 100)
    assert torch.allclose(x, torch.ones(2, dtype=torch.float64), atol=1e-10)  # the closed-form minimum
    assert loss < 1e-20 and evaluations > 2
    # at a minimum already, no step is taken
    y, same, _ = newton_polish(rosenbrock, torch.ones(2, dtype=torch.float64), 5)
    assert torch.equal(y, torch.ones(2, dtype=torch.float64)) and same == 0.0


def test_newton_steps_finish_an_ill_conditioned_moment_fit():
    g = torch.Generator().manual_seed(4)
    L, l_max = 12, 2
    basis = SphericalFourierBesselBasis(L, l_max=l_max, bandlimit=0.5)
    model = MomentModel(basis, MomentLayout(L, l_max, bandlimit=0.5), 2, third=True)
    a = basis.expand(random_molecule(L, g, dtype=torch.float64))
    dist = SHViewingDistribution.random(2, generator=g, uniform_weight=0.3)
    with torch.no_grad():
        m1, m2, m3 = model.with_third(a, dist.coeffs)
    one = torch.ones(1, dtype=torch.float64)
    target = ImageMoments(m1, m2, one, 0 * one, m3)
    start = a + 0.02 * a.norm() / a.numel() ** 0.5 * torch.randn(a.shape, generator=g, dtype=torch.float64)
    kwargs = dict(n_starts=1, iterations=(0, 0, 30), init=(start, dist.coeffs), whiten=True)
    lbfgs = fit_moments(model, target, **kwargs)
    newton = fit_moments(model, target, newton=10, **kwargs)
    err_lbfgs = align_volumes(basis, a, lbfgs.coeffs, n_grid=200).relative_error
    err_newton = align_volumes(basis, a, newton.coeffs, n_grid=200).relative_error
    assert err_newton < 1e-6 < err_lbfgs  # L-BFGS stalls in the flat directions, Newton does not
    assert newton.loss < 1e-3 * lbfgs.loss
    again = float(moment_loss(model, newton.coeffs, newton.view_coeffs, target, use_m3=True,
                              scales=whitening_scales(target)))
    assert again == pytest.approx(newton.loss, rel=1e-9, abs=1e-30)
