"""Real spherical harmonics, sphere quadrature and real Wigner D (physics/spherical_harmonics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special
from scipy.spatial.transform import Rotation

from cryo_lightning.physics.spherical_harmonics import (
    real_spherical_harmonics,
    sh_count,
    sh_index,
    sphere_quadrature,
    to_e3nn_frame,
    wigner_d,
)


def _unit_vectors(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


def _rotations(n: int, seed: int = 0) -> torch.Tensor:
    return torch.tensor(Rotation.random(n, random_state=seed).as_matrix())


def test_real_harmonics_match_scipy_complex_harmonics():
    v = _unit_vectors(64)
    l_max = 10
    y = real_spherical_harmonics(l_max, v).numpy()
    theta = np.arccos(v[:, 2].numpy())
    phi = np.arctan2(v[:, 1].numpy(), v[:, 0].numpy())
    for l in range(l_max + 1):
        for m in range(-l, l + 1):
            c = special.sph_harm_y(l, abs(m), theta, phi)  # Condon-Shortley phase included
            if m == 0:
                ref = c.real
            elif m > 0:
                ref = math.sqrt(2) * (-1) ** m * c.real
            else:
                ref = math.sqrt(2) * (-1) ** m * c.imag
            np.testing.assert_allclose(y[:, sh_index(l, m)], ref, atol=1e-12)


def test_low_degree_closed_forms_and_layout():
    v = _unit_vectors(16, seed=1)
    x, y, z = v.unbind(-1)
    Y = real_spherical_harmonics(2, v)
    assert Y.shape == (16, sh_count(2)) == (16, 9)
    pi = math.pi
    expected = {
        (0, 0): torch.full_like(x, 1 / math.sqrt(4 * pi)),
        (1, -1): math.sqrt(3 / (4 * pi)) * y,
        (1, 0): math.sqrt(3 / (4 * pi)) * z,
        (1, 1): math.sqrt(3 / (4 * pi)) * x,
        (2, -2): math.sqrt(15 / (4 * pi)) * x * y,
        (2, -1): math.sqrt(15 / (4 * pi)) * y * z,
        (2, 0): math.sqrt(5 / (16 * pi)) * (3 * z * z - 1),
        (2, 1): math.sqrt(15 / (4 * pi)) * x * z,
        (2, 2): math.sqrt(15 / (16 * pi)) * (x * x - y * y),
    }
    for (l, m), ref in expected.items():
        torch.testing.assert_close(Y[:, sh_index(l, m)], ref, rtol=0, atol=1e-13)


def test_poles_parity_and_scale_invariance():
    poles = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    Y = real_spherical_harmonics(6, poles)
    assert torch.isfinite(Y).all()
    for l in range(7):
        for m in range(-l, l + 1):
            top = math.sqrt((2 * l + 1) / (4 * math.pi)) if m == 0 else 0.0
            assert Y[0, sh_index(l, m)].item() == pytest.approx(top, abs=1e-13)
    v = _unit_vectors(8, seed=2)
    l_of = torch.tensor([l for l in range(7) for _ in range(2 * l + 1)])
    torch.testing.assert_close(real_spherical_harmonics(6, -v), real_spherical_harmonics(6, v) * (-1.0) ** l_of)
    torch.testing.assert_close(real_spherical_harmonics(6, 3.5 * v), real_spherical_harmonics(6, v))


def test_quadrature_integrates_monomials_and_harmonics_exactly():
    degree = 12
    nodes, weights = sphere_quadrature(degree)
    assert weights.sum().item() == pytest.approx(4 * math.pi, rel=1e-14)

    def exact(a: int, b: int, c: int) -> float:  # int_{S^2} x^a y^b z^c, even exponents
        g = math.gamma
        return 2 * g((a + 1) / 2) * g((b + 1) / 2) * g((c + 1) / 2) / g((a + b + c + 3) / 2)

    for a, b, c in [(2, 4, 6), (0, 0, 12), (8, 2, 2), (4, 4, 4)]:
        value = (weights * nodes[:, 0] ** a * nodes[:, 1] ** b * nodes[:, 2] ** c).sum().item()
        assert value == pytest.approx(exact(a, b, c), rel=1e-12)
    Y = real_spherical_harmonics(degree // 2, nodes)
    gram = (Y * weights[:, None]).T @ Y
    torch.testing.assert_close(gram, torch.eye(sh_count(degree // 2), dtype=torch.float64), rtol=0, atol=1e-13)


def test_wigner_d_definition_group_law_and_orthogonality():
    l_max = 8
    R, S = _rotations(2, seed=3)
    v = _unit_vectors(32, seed=4)
    DR, DS, DRS = wigner_d(l_max, R), wigner_d(l_max, S), wigner_d(l_max, R @ S)
    Y, YR = real_spherical_harmonics(l_max, v), real_spherical_harmonics(l_max, v @ R.T)
    for l in range(l_max + 1):
        sl = slice(l * l, (l + 1) ** 2)
        torch.testing.assert_close(YR[:, sl], Y[:, sl] @ DR[l].T, rtol=0, atol=1e-12)  # Y(R u) = D(R) Y(u)
        torch.testing.assert_close(DRS[l], DR[l] @ DS[l], rtol=0, atol=1e-12)
        eye = torch.eye(2 * l + 1, dtype=torch.float64)
        torch.testing.assert_close(DR[l] @ DR[l].T, eye, rtol=0, atol=1e-12)
    # D_1(R) = P R P^T, P: (x, y, z) -> (y, z, x).
    torch.testing.assert_close(DR[1], to_e3nn_frame(R, kind="rotation"), rtol=0, atol=1e-13)


def test_wigner_d_about_z_closed_form():
    a = 0.7
    Rz = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]],
                      dtype=torch.float64)
    D = wigner_d(5, Rz)
    for l in range(6):
        ref = torch.zeros(2 * l + 1, 2 * l + 1, dtype=torch.float64)
        ref[l, l] = 1.0
        for m in range(1, l + 1):
            # Rz u has azimuth phi + a: cos(m(phi + a)) = c cos(m phi) - s sin(m phi), and so on.
            c, s = math.cos(m * a), math.sin(m * a)
            ref[l + m, l + m], ref[l + m, l - m] = c, -s
            ref[l - m, l - m], ref[l - m, l + m] = c, s
        torch.testing.assert_close(D[l], ref, rtol=0, atol=1e-13)


def test_wigner_d_batches_and_follows_dtype():
    R = _rotations(6, seed=5).reshape(2, 3, 3, 3)
    D = wigner_d(3, R.float())
    assert D[3].shape == (2, 3, 7, 7) and D[3].dtype == torch.float32
    ref = wigner_d(3, R[1, 2])
    torch.testing.assert_close(D[3][1, 2], ref[3].float(), rtol=0, atol=1e-6)


def test_conversion_to_e3nn():
    o3 = pytest.importorskip("e3nn.o3")
    l_max = 6
    v = _unit_vectors(20, seed=6)
    ours = real_spherical_harmonics(l_max, v)
    p_v = to_e3nn_frame(v)
    theirs = torch.cat(
        [o3.spherical_harmonics(l, p_v, normalize=True, normalization="integral") for l in range(l_max + 1)], dim=-1
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    R = _rotations(3, seed=7)
    D = wigner_d(l_max, R)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn builds its generators in the default dtype
    try:
        for l in range(l_max + 1):
            d_e3nn = o3.Irrep(l, (-1) ** l).D_from_matrix(to_e3nn_frame(R, kind="rotation"))
            torch.testing.assert_close(D[l], d_e3nn, rtol=0, atol=1e-12)
    finally:
        torch.set_default_dtype(previous)
