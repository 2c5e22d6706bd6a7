"""Moment forward model (abinitio/moment_forward_model.py) against brute force, Monte Carlo and the projector."""

from __future__ import annotations

import math

import pytest
import torch

from cryo_lightning.abinitio.image_moments import MomentLayout
from cryo_lightning.abinitio.moment_forward_model import MomentModel, slice_images
from cryo_lightning.abinitio.volume_alignment import transform_coefficients, transform_viewing
from cryo_lightning.physics.ctf import CTFParams, ctf_2d
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.projection import project
from cryo_lightning.physics.rotations import directions_to_rotations, random_rotations
from cryo_lightning.physics.spherical_harmonics import sphere_quadrature
from cryo_lightning.physics.viewing_sh import SHViewingDistribution
from cryo_lightning.physics.volumes import random_molecule


def _problem(L: int, l_max: int, degree: int, seed: int = 0, ctfs: torch.Tensor | None = None, third: bool = False):
    g = torch.Generator().manual_seed(seed)
    basis = SphericalFourierBesselBasis(L, l_max=l_max)
    layout = MomentLayout(L, l_max)
    model = MomentModel(basis, layout, degree, ctfs=ctfs, third=third)
    a = basis.expand(random_molecule(L, g, dtype=torch.float64))
    dist = SHViewingDistribution.random(degree, generator=g)
    return basis, layout, model, a, dist, g


def _two_ctfs(L: int) -> torch.Tensor:
    params = CTFParams(defocus_u=torch.tensor([8000.0, 20000.0], dtype=torch.float64),
                       defocus_v=torch.tensor([8000.0, 20000.0], dtype=torch.float64),
                       defocus_angle=0.0, voltage=300.0, cs=2.7, amplitude_contrast=0.1)
    return ctf_2d(params, L, pixel_size=3.0)


def test_projection_matches_physics_projector():
    """The pixel pipeline equals project() of the voxel map (interpolation error) and P_H rotate(a, A)."""
    basis, layout, model, a, _, g = _problem(16, 4, 2)
    rot = random_rotations(6, generator=g, dtype=torch.float64)
    images = slice_images(basis, a, rot)
    reference = project(basis.evaluate(a), rot)
    assert float((images - reference).norm() / reference.norm()) < 1e-2
    direct = layout.expand(images)
    factored = model.project_coefficients(a, rot)
    assert float((direct - factored).abs().norm() / direct.abs().norm()) < 1e-12


def test_moments_equal_brute_force_so3_quadrature():
    """In-plane average by the m-decomposition == explicit equispaced in-plane angles (exact for trig degree 2 l_max)."""
    ctfs = _two_ctfs(16)
    basis, layout, model, a, dist, _ = _problem(16, 3, 4, ctfs=ctfs)
    m1, m2 = model(a, dist.coeffs)
    nodes, weights = sphere_quadrature(2 * 3 + 4)
    n_psi = 4 * 3 + 1
    psi = torch.arange(n_psi, dtype=torch.float64) * (360.0 / n_psi)
    rot = directions_to_rotations(nodes[:, None, :].expand(-1, n_psi, -1), psi=psi.expand(nodes.shape[0], -1))
    w = (weights / (4 * math.pi) * dist.density(nodes))[:, None].expand(-1, n_psi).reshape(-1) / n_psi
    for group in range(2):
        c = model.project_coefficients(a, rot.reshape(-1, 3, 3), group)  # (V * n_psi, n)
        ref1 = (w[:, None] * c).sum(0)
        assert float((ref1 - m1[group]).abs().max() / m1[group].abs().max()) < 1e-12
        for ck, mk in zip(layout.split(c), m2):
            ref2 = torch.einsum("n,nq,nr->qr", w.to(ck.dtype), ck, ck.conj())
            assert float((ref2 - mk[group]).abs().max() / mk[group].abs().max()) < 1e-12


def test_third_moment_slice_equals_brute_force_so3_quadrature():
    """E[c_0t c_k c_k^H] by the m-decomposition (aliased m1 = 0 mod 4 included) == explicit in-plane angles."""
    l_max, degree = 5, 2
    basis, layout, model, a, dist, _ = _problem(16, l_max, degree, ctfs=_two_ctfs(16), third=True)
    m1, m2, m3 = model.with_third(a, dist.coeffs)
    ref1, ref2 = model(a, dist.coeffs)
    assert torch.allclose(m1, ref1) and all(torch.allclose(x, y) for x, y in zip(m2, ref2))
    nodes, weights = sphere_quadrature(3 * l_max + degree)
    n_psi = 6 * l_max + 1  # exact for in-plane trigonometric degree 3 l_max
    psi = torch.arange(n_psi, dtype=torch.float64) * (360.0 / n_psi)
    rot = directions_to_rotations(nodes[:, None, :].expand(-1, n_psi, -1), psi=psi.expand(nodes.shape[0], -1))
    w = (weights / (4 * math.pi) * dist.density(nodes))[:, None].expand(-1, n_psi).reshape(-1) / n_psi
    q0 = layout.block_sizes[0]
    for group in range(2):
        c = model.project_coefficients(a, rot.reshape(-1, 3, 3), group)
        for ck, mk in zip(layout.split(c), m3):
            ref = torch.einsum("n,nt,nq,nr->tqr", w.to(ck.dtype), c[:, :q0], ck, ck.conj())
            assert float((ref - mk[group]).abs().max() / ref.abs().max()) < 1e-12
    # without the aliased terms the slice would be off well above round-off at L = 16
    slot0 = [t for t in model._triples if t[0] == 0]
    model._triples, full = slot0, m3
    _, _, plain = model.with_third(a, dist.coeffs)
    assert max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(plain, full)) > 1e-6
    with pytest.raises(ValueError, match="third=True"):
        MomentModel(basis, layout, degree).with_third(a, dist.coeffs)


def test_quadrature_is_exact():
    """A model with a higher-degree quadrature (b padded with zeros) gives the same moments."""
    basis, layout, model, a, dist, _ = _problem(16, 3, 2)
    bigger = MomentModel(basis, layout, 6)
    b = torch.zeros(bigger.b_count, dtype=torch.float64)
    b[: dist.coeffs.numel()] = dist.coeffs
    (m1, m2), (n1, n2) = model(a, dist.coeffs), bigger(a, b)
    torch.testing.assert_close(m1, n1, rtol=1e-12, atol=1e-12 * float(m1.abs().max()))
    for x, y in zip(m2, n2):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12 * float(x.abs().max()))


def test_moments_invariant_under_joint_rotation_and_mirror():
    basis, layout, model, a, dist, g = _problem(16, 4, 4)
    m1, m2 = model(a, dist.coeffs)
    R = random_rotations(1, generator=g, dtype=torch.float64)[0]
    for reflected in (False, True):
        ta = transform_coefficients(basis, a, R, reflected)
        tb = transform_viewing(dist.coeffs, 4, R, reflected)
        n1, n2 = model(ta, tb)
        # grid non-steerability breaks exact invariance slightly (in-plane rotations of the pixel grid)
        assert float((n1 - m1).abs().norm() / m1.abs().norm()) < 1e-2
        for x, y in zip(m2, n2):
            assert float((x - y).abs().norm() / x.abs().norm()) < 2e-2


def _features(x: torch.Tensor, matrix: bool) -> torch.Tensor:
    """Real, non-redundant coordinates of vectors ``(..., n)`` or Hermitian matrices ``(..., Q, Q)``."""
    if matrix:
        q = x.shape[-1]
        iu, iu1 = torch.triu_indices(q, q), torch.triu_indices(q, q, 1)
        return torch.cat([x[..., iu[0], iu[1]].real, x[..., iu1[0], iu1[1]].imag], dim=-1)
    return torch.cat([x.real, x.imag], dim=-1)


def _hotelling_z(samples: torch.Tensor, model_value: torch.Tensor) -> float:
    """``(T^2 - d) / sqrt(2 d)`` of the sample mean against the model: about N(0, 1) if the model is right.

    Coordinates that are constant over the samples (imaginary parts of the ``k = 0`` block) are
    dropped after checking that the model has them too.
    """
    matrix = samples.ndim == 3
    x, y = _features(samples, matrix), _features(model_value[None], matrix)[0]
    keep = x.std(0) > 1e-10 * x.std(0).max()
    assert float(torch.cat([(x[0, ~keep] - y[~keep]).abs(), y.new_zeros(1)]).max()) < 1e-9 * float(y.abs().max())
    x, y = x[:, keep], y[keep]
    n, d = x.shape
    mean = x.mean(0)
    t2 = n * float((mean - y) @ torch.linalg.solve(torch.cov(x.T), mean - y))
    return (t2 - d) / math.sqrt(2 * d)


def test_forward_model_matches_monte_carlo_with_ctf():
    """Moments of 12,000 simulated images (2 CTF groups, non-uniform views) agree within MC error."""
    L, l_max, degree, n = 16, 4, 4, 12_000
    ctfs = _two_ctfs(L)
    basis, layout, model, a, dist, g = _problem(L, l_max, degree, seed=3, ctfs=ctfs)
    m1, m2 = model(a, dist.coeffs)
    wrong1, wrong2 = model(a, SHViewingDistribution.uniform(degree).coeffs)
    rot = dist.sample(n, generator=g, dtype=torch.float64)
    for group in range(2):
        r = rot[group::2]
        c = torch.cat([layout.expand(slice_images(basis, a, chunk, ctfs[group])) for chunk in r.split(2500)])
        z1 = _hotelling_z(c, m1[group])
        assert abs(z1) < 4, z1
        assert _hotelling_z(c, wrong1[group]) > 20  # the test can tell distributions apart
        for ck, mk, wk in zip(layout.split(c), m2, wrong2):
            outer = ck[:, :, None] * ck[:, None, :].conj()
            z2 = _hotelling_z(outer, mk[group])
            assert abs(z2) < 4, z2
            assert _hotelling_z(outer, wk[group]) > 20


def test_gradcheck():
    basis = SphericalFourierBesselBasis(8, l_max=2)
    layout = MomentLayout(8, 2)
    model = MomentModel(basis, layout, 2)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(basis.layout.count, generator=g, dtype=torch.float64, requires_grad=True)
    b = SHViewingDistribution.random(2, generator=g).coeffs.clone().requires_grad_(True)

    def fn(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m1, m2 = model(a, b)
        return (m1, *m2)

    assert torch.autograd.gradcheck(fn, (a, b), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_model_requires_matching_sizes():
    with pytest.raises(ValueError):
        MomentModel(SphericalFourierBesselBasis(16, l_max=2), MomentLayout(12, 2), 2)
