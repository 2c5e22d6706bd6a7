from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.spatial.transform import Rotation

from cryo_lightning.physics.rotations import (
    quaternion_to_matrix,
    ViewingDistribution,
    directions_to_rotations,
    euler_to_matrix,
    geodesic_distance,
    matrix_to_euler,
    random_rotations,
    register_rotations,
    sample_vmf,
    viewing_direction,
)

J = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _relion_formula(rot: float, tilt: float, psi: float) -> np.ndarray:
    """RELION Euler_angles2matrix written out (research/data_and_users.md section 4.4)."""
    a, b, g = np.deg2rad([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    return np.array(
        [
            [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
            [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
            [sb * ca, sb * sa, cb],
        ]
    )


def _rz(deg: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=dtype)


def test_euler_to_matrix_matches_scipy_and_relion_formula():
    rng = np.random.default_rng(0)
    angles = rng.uniform([-180, 0, -180], [180, 180, 180], size=(500, 3))
    expected = Rotation.from_euler("ZYZ", angles, degrees=True).inv().as_matrix()
    got = euler_to_matrix(torch.tensor(angles, dtype=torch.float32))
    assert got.dtype == torch.float32 and got.shape == (500, 3, 3)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    for rot, tilt, psi in [(30.0, 60.0, -45.0), (170.0, 10.0, 95.0), (-90.0, 135.0, 0.0)]:
        got = euler_to_matrix(torch.tensor([rot, tilt, psi], dtype=torch.float64))
        np.testing.assert_allclose(got.numpy(), _relion_formula(rot, tilt, psi), atol=1e-12)
        # Viewing direction stated in the conventions.
        t, r = math.radians(tilt), math.radians(rot)
        expected_dir = [math.sin(t) * math.cos(r), math.sin(t) * math.sin(r), math.cos(t)]
        np.testing.assert_allclose(viewing_direction(got).numpy(), expected_dir, atol=1e-12)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_euler_round_trip(dtype, atol):
    a = random_rotations(1000, generator=_gen(1), dtype=dtype)
    angles = matrix_to_euler(a)
    assert angles.dtype == dtype
    assert (angles[:, 0] > -180).all() and (angles[:, 0] <= 180).all()
    assert (angles[:, 2] > -180).all() and (angles[:, 2] <= 180).all()
    assert (angles[:, 1] >= 0).all() and (angles[:, 1] <= 180).all()
    torch.testing.assert_close(euler_to_matrix(angles), a, atol=atol, rtol=0)
    # scipy agrees on the angles themselves away from gimbal lock.
    expected = Rotation.from_matrix(a.double().numpy()).inv().as_euler("ZYZ", degrees=True)
    diff = (angles.double().numpy() - expected + 180) % 360 - 180
    assert np.abs(diff).max() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_euler_gimbal_lock(dtype):
    # tilt = 0: A = Rz(-(rot + psi)); tilt = 180: A = Rz(rot - psi) Ry(-180). rot -> 0, all in psi.
    cases = [((30.0, 0.0, 40.0), (0.0, 0.0, 70.0)), ((30.0, 180.0, 40.0), (0.0, 180.0, 10.0)),
             ((100.0, 0.0, 90.0), (0.0, 0.0, -170.0)), ((-90.0, 180.0, 90.0), (0.0, 180.0, 180.0))]
    for given, expected in cases:
        a = euler_to_matrix(torch.tensor(given, dtype=dtype))
        got = matrix_to_euler(a)
        assert not got.isnan().any()
        diff = (got.double().numpy() - np.array(expected) + 180) % 360 - 180
        assert np.abs(diff).max() < 1e-3
        torch.testing.assert_close(euler_to_matrix(got), a, atol=1e-6, rtol=0)
    # Nearly locked: tiny tilts still reproduce the matrix.
    near = [[25.0, 1e-4, -60.0], [25.0, 180 - 1e-4, -60.0], [25.0, 1e-2, 170.0]]
    near = torch.tensor(near, dtype=dtype)
    a = euler_to_matrix(near)
    torch.testing.assert_close(euler_to_matrix(matrix_to_euler(a)), a, atol=1e-6, rtol=0)


def test_uniform_rotations_are_haar():
    a = random_rotations(20000, generator=_gen(2))
    assert a.shape == (20000, 3, 3) and a.dtype == torch.float32
    eye = torch.eye(3).expand_as(a)
    torch.testing.assert_close(a @ a.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(a), torch.ones(20000), atol=1e-5, rtol=0)
    # Haar: rotation angle has density (1 - cos t) / pi, CDF (t - sin t) / pi.
    theta = geodesic_distance(torch.eye(3), a).double().numpy() * math.pi / 180
    assert stats.kstest(theta, lambda t: (t - np.sin(t)) / np.pi).pvalue > 0.01
    assert a.mean(0).abs().max() < 0.02
    # Viewing directions uniform on the sphere: z uniform on [-1, 1], azimuth uniform.
    d = viewing_direction(a).double().numpy()
    assert stats.kstest(d[:, 2], "uniform", args=(-1, 2)).pvalue > 0.01
    assert stats.kstest(np.arctan2(d[:, 1], d[:, 0]), "uniform", args=(-np.pi, 2 * np.pi)).pvalue > 0.01


def test_vmf_matches_closed_forms():
    kappa, n = 5.0, 20000
    mu = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64) / math.sqrt(6)
    x = sample_vmf(mu, kappa, n, generator=_gen(3))
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(n, dtype=torch.float64))
    w = (x @ mu).numpy()
    # Mean resultant length A(kappa) = coth(kappa) - 1/kappa; sd(w) ~ 0.2 so MC sd ~ 0.0014.
    assert abs(w.mean() - (1 / math.tanh(kappa) - 1 / kappa)) < 0.007
    resultant = x.mean(0)
    assert abs(resultant.norm().item() - (1 / math.tanh(kappa) - 1 / kappa)) < 0.007
    assert torch.dot(resultant / resultant.norm(), mu) > 0.999
    # Full law of w: CDF (exp(kappa t) - exp(-kappa)) / (exp(kappa) - exp(-kappa)).
    cdf = lambda t: (np.exp(kappa * t) - np.exp(-kappa)) / (np.exp(kappa) - np.exp(-kappa))  # noqa: E731
    assert stats.kstest(w, cdf).pvalue > 0.01


def test_vmf_extreme_kappas():
    mu = torch.tensor([0.0, 0.0, -1.0])
    uniform = sample_vmf(mu, 0.0, 20000, generator=_gen(4))
    assert not uniform.isnan().any()
    assert stats.kstest(uniform[:, 2].double().numpy(), "uniform", args=(-1, 2)).pvalue > 0.01
    tiny = sample_vmf(mu, 1e-12, 1000, generator=_gen(4))
    sharp = sample_vmf(mu, 1e5, 1000, generator=_gen(4))
    assert not tiny.isnan().any() and not sharp.isnan().any()
    assert (sharp @ mu).min() > 0.999


def test_viewing_distribution_mixture():
    means = [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]
    dist = ViewingDistribution(weights=[0.3, 0.7], means=means, kappas=[200.0, 200.0])
    a = dist.sample(20000, generator=_gen(5))
    assert a.shape == (20000, 3, 3)
    d = viewing_direction(a)
    first = (d @ torch.tensor(means[0]) > d @ torch.tensor(means[1])).double().mean().item()
    assert abs(first - 0.3) < 0.016  # 5 binomial sd
    # Pure uniform mixture gives Haar poses (uniform psi included).
    haar = ViewingDistribution.uniform().sample(20000, generator=_gen(6), dtype=torch.float64)
    theta = geodesic_distance(torch.eye(3, dtype=torch.float64), haar).numpy() * math.pi / 180
    assert stats.kstest(theta, lambda t: (t - np.sin(t)) / np.pi).pvalue > 0.01
    with pytest.raises(ValueError):
        ViewingDistribution(weights=[1.0], means=[[0, 0, 1], [1, 0, 0]], kappas=[1.0])


def test_directions_to_rotations_and_determinism():
    d = torch.randn(100, 3, generator=_gen(7), dtype=torch.float64)
    a = directions_to_rotations(d, generator=_gen(8))
    torch.testing.assert_close(viewing_direction(a), d / d.norm(dim=-1, keepdim=True))
    dist = ViewingDistribution(weights=[1, 2], means=[[0, 1, 0], [1, 1, 1]], kappas=[0.0, 3.0])
    for dtype in (torch.float32, torch.float64):
        first, second = dist.sample(50, _gen(9), dtype=dtype), dist.sample(50, _gen(9), dtype=dtype)
        torch.testing.assert_close(first, second, atol=0, rtol=0)
        first, second = (random_rotations(50, _gen(9), dtype=dtype) for _ in range(2))
        torch.testing.assert_close(first, second, atol=0, rtol=0)
        assert dist.sample(50, _gen(9), dtype=dtype).dtype == dtype


def test_geodesic_distance():
    r = random_rotations(200, generator=_gen(10), dtype=torch.float64)
    for theta in (0.0, 1e-4, 37.0, 179.9, 180.0):
        got = geodesic_distance(r, r @ _rz(theta))
        expected = torch.full((200,), theta, dtype=torch.float64)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    s = random_rotations(200, generator=_gen(11), dtype=torch.float64)
    expected = (Rotation.from_matrix(r.numpy()).inv() * Rotation.from_matrix(s.numpy())).magnitude()
    np.testing.assert_allclose(geodesic_distance(r, s).numpy(), np.rad2deg(expected), atol=1e-8)
    assert not geodesic_distance(r.float(), r.float()).isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_registration_recovers_rotation_and_hand(dtype):
    ref = random_rotations(300, generator=_gen(12), dtype=dtype)
    q = random_rotations(1, generator=_gen(13), dtype=dtype)[0]
    j = J.to(dtype)
    for reflect in (False, True):
        est = (j @ ref @ j if reflect else ref) @ q
        res = register_rotations(est, ref)
        assert res.reflected is reflect
        assert res.mean_error < 1e-3 and res.median_error < 1e-3
        assert geodesic_distance(res.rotation, q).item() < 1e-3
        torch.testing.assert_close(res.aligned, ref, atol=1e-5, rtol=0)
        assert res.aligned.dtype == dtype and res.errors.shape == (300,)


def test_registration_with_noise():
    ref = random_rotations(500, generator=_gen(14), dtype=torch.float64)
    q = random_rotations(1, generator=_gen(15), dtype=torch.float64)[0]
    # Perturb each pose by a 2 degree rotation about a random axis.
    axis = torch.randn(500, 3, generator=_gen(16), dtype=torch.float64)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    noise = torch.tensor(Rotation.from_rotvec(axis.numpy() * math.radians(2.0)).as_matrix())
    est = J @ ref @ J @ q @ noise
    res = register_rotations(est, ref)
    assert res.reflected
    assert abs(res.mean_error - 2.0) < 0.2 and res.median_error < 2.5
    assert geodesic_distance(res.rotation, q).item() < 0.5


def test_quaternion_is_scalar_first_and_active():
    theta = 0.3
    q = torch.tensor([math.cos(theta / 2), 0.0, 0.0, math.sin(theta / 2)], dtype=torch.float64)
    expected = torch.tensor([[math.cos(theta), -math.sin(theta), 0.0],
                             [math.sin(theta), math.cos(theta), 0.0],
                             [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(quaternion_to_matrix(q), expected)
