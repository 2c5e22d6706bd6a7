"""CoefficientPrior (models/coefficient_prior.py): fit recovers an invariant Gaussian; energy is O(3)-invariant."""

from __future__ import annotations

import torch

from cryo_lightning.models.coefficient_prior import CoefficientPrior
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.rotations import random_rotations


def _invariant_gaussian(radial_counts: list[int], n: int, g: torch.Generator):
    """Samples ``(n, count)`` of a Gaussian with radial covariances ``C_l`` and a degree-0 mean."""
    covs, blocks = [], []
    mean = torch.randn(radial_counts[0], generator=g, dtype=torch.float64)
    for l, s in enumerate(radial_counts):
        x = torch.randn(s, s, generator=g, dtype=torch.float64)
        cov = x @ x.T / s + 0.1 * torch.eye(s, dtype=torch.float64)
        covs.append(cov)
        z = torch.randn(n, s, 2 * l + 1, generator=g, dtype=torch.float64)
        blk = torch.einsum("st,ntm->nsm", torch.linalg.cholesky(cov), z)
        if l == 0:
            blk = blk + mean[:, None]
        blocks.append(blk.flatten(1))
    return torch.cat(blocks, dim=-1), mean, covs


def test_fit_recovers_the_gaussian_and_energy_is_one_per_coefficient():
    g = torch.Generator().manual_seed(0)
    counts = [4, 3, 3]
    samples, mean, covs = _invariant_gaussian(counts, 4000, g)
    prior = CoefficientPrior("4x0e+3x1o+3x2e").fit(samples)
    assert float(prior.fitted) == 1.0
    torch.testing.assert_close(prior.mean, mean, atol=0.06, rtol=0)
    for l, cov in enumerate(covs):
        fitted = torch.linalg.inv(getattr(prior, f"precision_{l}"))
        assert float((fitted - cov).norm() / cov.norm()) < 0.08, l
    energy = prior.energy(samples)
    assert energy.shape == (4000,)
    assert abs(float(energy.mean()) - 1.0) < 0.02  # E[x^T C^-1 x] = dim, divided by count
    # far from the bank: a scaled-up sample costs more
    assert float(prior.energy(3 * samples[:100]).mean()) > 5


def test_energy_is_invariant_under_rotations_and_mirrors():
    g = torch.Generator().manual_seed(1)
    basis = SphericalFourierBesselBasis(16, l_max=3, bandlimit=0.4)
    irreps = basis.layout.irreps()
    counts = list(basis.layout.radial_counts)
    samples, _, _ = _invariant_gaussian(counts, 200, g)
    prior = CoefficientPrior(irreps).fit(samples)
    a = torch.randn(8, basis.layout.count, generator=g, dtype=torch.float64)
    rotations = random_rotations(8, generator=g, dtype=torch.float64)
    base = prior.energy(a)
    torch.testing.assert_close(prior.energy(basis.rotate(a, rotations)), base, rtol=1e-10, atol=0)
    torch.testing.assert_close(prior.energy(a * basis.reflection_signs("z")), base, rtol=1e-10, atol=0)
    # saved and restored with the module's state
    restored = CoefficientPrior(irreps)
    restored.load_state_dict(prior.state_dict())
    torch.testing.assert_close(restored.energy(a), base, rtol=0, atol=0)
