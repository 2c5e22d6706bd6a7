"""Spherical Fourier-Bessel volume basis (physics/fourier_bessel.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special
from scipy.spatial.transform import Rotation

from cryo_lightning.physics.fourier_bessel import SFBLayout, SphericalFourierBesselBasis, spherical_bessel_zeros
from cryo_lightning.physics.projection import project


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _gaussians(L: int, centres: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """Sum of isotropic Gaussians at ``centres (n, 3)`` pixels ``(x, y, z)`` from index ``L // 2``."""
    c = torch.arange(L, dtype=torch.float64) - L // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    r = torch.stack([x, y, z], dim=-1)
    return sum(torch.exp(-((r - p) ** 2).sum(-1) / (2 * sigma**2)) for p in centres)


def _centres(n: int, seed: int, spread: float = 10.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * spread


@pytest.fixture(scope="module")
def basis32() -> SphericalFourierBesselBasis:
    return SphericalFourierBesselBasis(32, l_max=12)


def test_spherical_bessel_zeros():
    np.testing.assert_allclose(spherical_bessel_zeros(0, 20.0), np.pi * np.arange(1, 7), rtol=0, atol=1e-12)
    z1 = spherical_bessel_zeros(1, 30.0)  # j_1(x) = 0  <=>  tan x = x
    np.testing.assert_allclose(np.tan(z1), z1, rtol=1e-9)
    assert z1[0] == pytest.approx(4.493409457909064, abs=1e-12)
    for l in (3, 10, 25):
        z = spherical_bessel_zeros(l, 60.0)
        np.testing.assert_allclose(special.spherical_jn(l, z), 0.0, atol=1e-13)
        # Every sign change of j_l on a fine grid is found, none twice.
        x = np.linspace(l + 0.5, 60.0, 200_001)
        f = special.spherical_jn(l, x)
        assert len(z) == int((np.sign(f[:-1]) * np.sign(f[1:]) < 0).sum())


def test_truncation_rule_counts():
    # Counts of the ASPIRE rule z_ls < pi L / 2 (research notes, section 2.2).
    for l_max, count, s0, s_last in [(6, 671, 15, 13), (8, 1055, 15, 12), (10, 1495, 15, 11)]:
        layout = SphericalFourierBesselBasis(32, l_max=l_max).layout
        assert (layout.count, layout.radial_counts[0], layout.radial_counts[-1]) == (count, s0, s_last)
    b = SphericalFourierBesselBasis(16)
    z = b.zeros
    assert all(zl.max() < math.pi * 16 / 2 for zl in z if len(zl)) and len(z[-1]) > 0
    assert len(spherical_bessel_zeros(len(z), math.pi * 16 / 2)) == 0  # no degree left out


def test_radial_functions_are_orthonormal_on_the_ball():
    b = SphericalFourierBesselBasis(16, l_max=4, bandlimit=0.4)
    x, w = np.polynomial.legendre.leggauss(200)
    r = 0.2 * (x + 1)  # [0, c]
    rad = b.radial_functions(torch.as_tensor(r))
    for l in (0, 3, 4):
        j = rad[l].numpy()
        gram = (j * (0.2 * w * r * r)[:, None]).T @ j
        np.testing.assert_allclose(gram, np.eye(j.shape[1]), atol=1e-10)
    value = integrate.quad(lambda t: b.radial_functions(torch.tensor([t]))[2][0, 1].item() ** 2 * t * t, 0, 0.4)[0]
    assert value == pytest.approx(1.0, rel=1e-8)
    assert b.radial_functions(torch.tensor([0.4, 0.45]))[1].abs().max().item() == 0.0


@pytest.mark.parametrize("L,l_max", [(16, None), (17, None), (32, 8)])
def test_expand_evaluate_round_trip(L, l_max):
    b = SphericalFourierBesselBasis(L, l_max=l_max)
    g = torch.Generator().manual_seed(L)
    c = torch.randn(2, b.layout.count, generator=g, dtype=torch.float64)
    v = b.evaluate(c)
    assert v.shape == (2, L, L, L)
    assert _rel(b.expand(v), c) < 1e-6  # acceptance: <= 1e-3
    assert _rel(b.evaluate(b.expand(v)), v) < 1e-6
    # Parseval: the grid Riemann sum of an orthonormal basis, ||V||^2 ~ ||c||^2.
    ratio = v.pow(2).sum((-3, -2, -1)) / c.pow(2).sum(-1)
    torch.testing.assert_close(ratio, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-2)


def test_expansion_of_a_smooth_volume(basis32):
    v = _gaussians(32, _centres(5, seed=1))
    assert _rel(basis32.evaluate(basis32.expand(v)), v) < 1e-3


def test_coefficients_are_real_space_harmonics():
    """(-i)^l convention: c_lsm multiplies a real-space function g_ls(|x|) Y_lm(x / |x|)."""
    b = SphericalFourierBesselBasis(16, l_max=2)
    C, d = 8, 2

    def volume(l, s, m):
        c = torch.zeros(b.layout.count, dtype=torch.float64)
        c[b.layout.index(l, s, m)] = 1.0
        return b.evaluate(c)

    v = volume(1, 0, 0)  # ~ z: positive at +z (array axis 0), odd
    assert v[C + d, C, C] > 0 and v[C - d, C, C] == pytest.approx(-v[C + d, C, C].item())
    assert abs(v[C, C + d, C].item()) < 1e-12 and abs(v[C, C, C + d].item()) < 1e-12
    assert volume(1, 0, 1)[C, C, C + d] > 0  # ~ x, array axis 2
    assert volume(1, 0, -1)[C, C + d, C] > 0  # ~ y, array axis 1
    v = volume(2, 0, 0)  # ~ 3 z^2 - r^2
    assert v[C + d, C, C].item() == pytest.approx(-2 * v[C, C, C + d].item())
    assert v[C, C + d, C].item() == pytest.approx(v[C, C, C + d].item())


def test_fourier_values_match_the_grid_and_dft(basis32):
    b = basis32
    c = torch.randn(b.layout.count, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grid = b.fourier_grid(c)
    idx = torch.tensor([[16, 16, 16], [20, 13, 25], [5, 16, 18], [16, 30, 16]])  # (z, y, x) indices
    k = (idx.flip(-1) - 16).double() / 32  # (x, y, z) cycles/pixel
    torch.testing.assert_close(b.fourier_values(c, k), grid[idx[:, 0], idx[:, 1], idx[:, 2]])
    # The grid is the DFT of the evaluated volume inside the ball.
    from cryo_lightning.physics.fourier import fft3c

    inside = grid != 0
    torch.testing.assert_close(fft3c(b.evaluate(c))[inside], grid[inside], rtol=0, atol=1e-9)


def test_rotation_matches_rotated_volume(basis32):
    """Acceptance: rotating coefficients equals rotating the volume, V_R(x) = V(R^T x), at L = 32."""
    b = basis32
    centres = _centres(5, seed=3)
    R = torch.tensor(Rotation.from_rotvec([0.4, -1.1, 0.7]).as_matrix())
    v, v_rot = _gaussians(32, centres), _gaussians(32, centres @ R.T)
    c = b.expand(v)
    c_rot = b.rotate(c, R)
    assert _rel(b.evaluate(c_rot), v_rot) < 1e-2  # observed ~2e-4
    assert _rel(c_rot, b.expand(v_rot)) < 1e-2
    assert c_rot.norm().item() == pytest.approx(c.norm().item(), rel=1e-12)


def test_rotation_agrees_with_projection_at_the_pose(basis32):
    """Identity projection of V rotated by a RELION pose A == projection of V at pose A."""
    b = basis32
    c = b.expand(_gaussians(32, _centres(4, seed=4)))
    A = torch.tensor(Rotation.from_euler("ZYZ", [30.0, 50.0, -70.0], degrees=True).inv().as_matrix())
    at_pose = project(b.evaluate(c).float(), A[None].float())
    rotated = project(b.evaluate(b.rotate(c, A)).float(), torch.eye(3)[None])
    assert _rel(rotated, at_pose) < 1e-2  # observed ~1e-3 (projector interpolation)


def test_rotation_is_a_group_action_and_batches():
    b = SphericalFourierBesselBasis(12, l_max=5)
    g = torch.Generator().manual_seed(5)
    c = torch.randn(3, b.layout.count, generator=g, dtype=torch.float64)
    R, S = torch.tensor(Rotation.random(2, random_state=6).as_matrix())
    torch.testing.assert_close(b.rotate(b.rotate(c, R), S), b.rotate(c, S @ R))
    per_item = torch.stack([R, S, R @ S])
    batched = b.rotate(c, per_item)
    torch.testing.assert_close(batched[1], b.rotate(c[1], S))
    assert b.rotate(c.float(), R.float()).dtype == torch.float32


@pytest.mark.parametrize("L", [32, 17])
@pytest.mark.parametrize("axis,dim", [("z", 0), ("y", 1), ("x", 2)])
def test_reflection_matches_array_flip(L, axis, dim):
    b = SphericalFourierBesselBasis(L, l_max=12 if L == 32 else None)
    v = _gaussians(L, _centres(4, seed=7, spread=10.0 * L / 32), sigma=2.0 * L / 32 if L == 32 else 1.5)
    # Flip about index L // 2: i -> 2 (L // 2) - i (periodic for the unpaired even-L plane).
    flipped = torch.roll(torch.flip(v, [dim]), 1 - L % 2, dim)
    c = b.expand(v)
    assert _rel(b.reflect(c, axis), b.expand(flipped)) < 1e-6
    assert _rel(b.evaluate(b.reflect(c, axis)), flipped) < 2e-3


def test_inversion_is_parity_and_z_mirror_signs():
    b = SphericalFourierBesselBasis(12, l_max=4)
    lsm = b.layout.lsm()
    l, m = lsm[:, 0], lsm[:, 2]
    signs = b.reflection_signs("x") * b.reflection_signs("y") * b.reflection_signs("z")
    torch.testing.assert_close(signs, (-1.0) ** l.double())
    torch.testing.assert_close(b.reflection_signs("z"), (-1.0) ** (l + m).double())


def test_layout():
    layout = SFBLayout((3, 2, 0, 1))
    assert layout.count == 3 + 2 * 3 + 0 + 1 * 7
    assert layout.irreps() == "3x0e+2x1o+1x3o"
    lsm = layout.lsm()
    for i, (l, s, m) in enumerate(lsm.tolist()):
        assert layout.index(l, s, m) == i
    c = torch.arange(layout.count, dtype=torch.float64)
    blocks = layout.blocks(c)
    assert [tuple(x.shape) for x in blocks] == [(3, 1), (2, 3), (0, 5), (1, 7)]
    assert blocks[1][1, 2].item() == layout.index(1, 1, 1)
    torch.testing.assert_close(layout.from_blocks(blocks), c)
    o3 = pytest.importorskip("e3nn.o3")
    assert o3.Irreps(layout.irreps()).dim == layout.count


def test_dtype_and_batch_shapes():
    b = SphericalFourierBesselBasis(12, l_max=3)
    v = torch.randn(2, 3, 12, 12, 12, generator=torch.Generator().manual_seed(8))
    c = b.expand(v)
    assert c.shape == (2, 3, b.layout.count) and c.dtype == torch.float32
    out = b.evaluate(c)
    assert out.shape == v.shape and out.dtype == torch.float32
