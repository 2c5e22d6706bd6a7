"""Even-degree, in-plane-uniform viewing distributions and their sampler (physics/viewing_sh.py)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import special
from scipy.spatial.transform import Rotation

from cryo_lightning.physics.rotations import ViewingDistribution, matrix_to_euler
from cryo_lightning.physics.spherical_harmonics import real_spherical_harmonics, sphere_quadrature, wigner_d
from cryo_lightning.physics.viewing_sh import SHViewingDistribution, even_sh_count


def _legendre(l: int, t: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(special.eval_legendre(l, t.numpy()))


def _dense_sphere(n: int = 100_000, seed: int = 0) -> torch.Tensor:
    v = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


def test_coefficient_counts():
    assert [even_sh_count(d) for d in (0, 2, 4, 6, 8, 10)] == [1, 6, 15, 28, 45, 66]
    with pytest.raises(ValueError):
        even_sh_count(3)


def test_zonal_legendre_closed_form():
    """rho = 1 + b_20 P_2(v_z) + b_40 P_4(v_z): projection recovers b exactly; odd parts vanish."""
    def fn(v):
        z = v[:, 2]
        return 1 + 0.5 * _legendre(2, z) + 0.2 * _legendre(4, z) + 0.7 * _legendre(3, z) + 0.3 * v[:, 0]

    d = SHViewingDistribution.from_function(fn, degree=6)
    expected = torch.zeros(even_sh_count(6), dtype=torch.float64)
    expected[0], expected[1 + 2], expected[6 + 4] = 1.0, 0.5, 0.2  # (l, m) = (0, 0), (2, 0), (4, 0)
    torch.testing.assert_close(d.coeffs, expected, rtol=0, atol=1e-13)
    v = _dense_sphere(100)
    z = v[:, 2]
    torch.testing.assert_close(d.density(v), 1 + 0.5 * _legendre(2, z) + 0.2 * _legendre(4, z))


def test_density_is_row_zero_of_wigner_d_and_has_mean_one():
    d = SHViewingDistribution.random(6, generator=torch.Generator().manual_seed(1))
    A = torch.tensor(Rotation.random(10, random_state=2).as_matrix())
    D = wigner_d(6, A)
    ref = torch.zeros(10, dtype=torch.float64)
    k = 0
    for l in range(0, 7, 2):
        n = 2 * l + 1
        ref += D[l][:, l, :] @ d.coeffs[k : k + n]  # D_l(A)[m' = 0, m]
        torch.testing.assert_close(D[l][:, l, :], D[l].transpose(-1, -2)[:, :, l])  # = D_l(A^T)[m, 0]
        k += n
    torch.testing.assert_close(d.density_of_poses(A), ref)
    nodes, weights = sphere_quadrature(12)
    assert (weights * d.density(nodes)).sum().item() / (4 * math.pi) == pytest.approx(1.0, abs=1e-13)


def test_vmf_projection_matches_modified_bessel_closed_form():
    kappa = 3.0
    d = SHViewingDistribution.from_vmf(ViewingDistribution([1.0], [[0.0, 0.0, 2.0]], [kappa]), degree=8)
    k = 0
    for l in range(0, 9, 2):
        for m in range(-l, l + 1):
            ref = (2 * l + 1) * special.spherical_in(l, kappa) / special.spherical_in(0, kappa) if m == 0 else 0.0
            assert d.coeffs[k].item() == pytest.approx(ref, abs=1e-10)
            k += 1


def test_random_distributions_are_nonnegative_and_bounds_hold():
    v = _dense_sphere()
    for degree, seed in [(2, 3), (4, 4), (8, 5)]:
        d = SHViewingDistribution.random(degree, generator=torch.Generator().manual_seed(seed))
        assert d.coeffs[0].item() == 1.0
        values = d.density(v)
        assert values.min().item() >= -1e-12
        assert values.std().item() > 0.1  # not uniform
        lower, upper = d.bounds()
        assert lower <= values.min().item() and upper >= values.max().item()
        assert upper - values.max().item() < 0.02 * values.max().item()  # the bound is tight


def test_nonnegative_certifies_a_truncated_sharp_distribution():
    sharp = ViewingDistribution([1.0], [[0.3, 0.0, 1.0]], [40.0])
    d = SHViewingDistribution.from_vmf(sharp, degree=4)
    v = _dense_sphere()
    assert d.density(v).min().item() < -0.5  # truncation made it negative
    fixed = d.nonnegative()
    assert fixed.bounds()[0] >= 0.0
    assert fixed.density(v).min().item() >= 0.0
    assert fixed.coeffs[0].item() == 1.0
    assert fixed.density(torch.tensor([[0.3, 0.0, 1.0]], dtype=torch.float64)).item() > 3.0  # still peaked
    assert fixed.nonnegative() is fixed


def test_sampler_matches_density_monte_carlo():
    """Acceptance: sample means of Y_lm(v), l <= 6, equal b_lm / sqrt(4 pi (2l + 1)) within 4 sigma."""
    g = torch.Generator().manual_seed(6)
    d = SHViewingDistribution.random(4, generator=g)
    n = 20_000
    A = d.sample(n, generator=g, dtype=torch.float64)
    Y = real_spherical_harmonics(6, A[:, 2, :])
    expected = torch.zeros(Y.shape[-1], dtype=torch.float64)
    k = 0
    for l in range(0, 5, 2):
        for m in range(-l, l + 1):
            expected[l * l + l + m] = d.coeffs[k] / math.sqrt(4 * math.pi * (2 * l + 1))
            k += 1
    sigma = Y.std(0) / math.sqrt(n)
    z = (Y.mean(0) - expected)[1:] / sigma[1:]
    assert z.abs().max().item() < 4.0


def test_sampler_poses_are_rotations_with_uniform_in_plane_angle():
    g = torch.Generator().manual_seed(7)
    d = SHViewingDistribution.random(2, generator=g)
    A = d.sample(8_000, generator=g, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand(len(A), 3, 3)
    torch.testing.assert_close(A @ A.transpose(-1, -2), eye)
    torch.testing.assert_close(torch.linalg.det(A), torch.ones(len(A), dtype=torch.float64))
    psi = torch.deg2rad(matrix_to_euler(A)[:, 2])
    for f in (psi.cos(), psi.sin(), (2 * psi).cos(), (2 * psi).sin()):
        assert abs(f.mean().item()) < 4 * f.std().item() / math.sqrt(len(f))


def test_sampler_call_style_and_reproducibility():
    d = SHViewingDistribution.random(2, generator=torch.Generator().manual_seed(8))
    a = d.sample(50, generator=torch.Generator().manual_seed(9))
    b = d.sample(50, generator=torch.Generator().manual_seed(9))
    assert a.shape == (50, 3, 3) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    u = SHViewingDistribution.uniform(4)
    assert u.bounds() == pytest.approx((1.0, 1.0))
    assert u.sample_directions(10, generator=torch.Generator().manual_seed(0)).shape == (10, 3)
