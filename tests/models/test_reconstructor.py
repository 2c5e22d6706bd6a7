"""Learned moment reconstructor (models/reconstructor.py): conventions and O(3) equivariance."""

from __future__ import annotations

import pytest
import torch

from cryo_lightning.abinitio.image_moments import ImageMoments, MomentLayout
from cryo_lightning.abinitio.moment_forward_model import MomentModel
from cryo_lightning.abinitio.moment_loss import moment_loss
from cryo_lightning.abinitio.volume_alignment import transform_viewing
from cryo_lightning.models.reconstructor import MomentReconstructor, viewing_irreps
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.rotations import random_rotations
from cryo_lightning.physics.spherical_harmonics import to_e3nn_frame
from cryo_lightning.physics.viewing_sh import SHViewingDistribution
from cryo_lightning.physics.volumes import random_molecule

o3 = pytest.importorskip("e3nn.o3")

MIRROR_Z = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


@pytest.fixture(scope="module")
def problem():
    L, l_max, degree = 16, 2, 2
    g = torch.Generator().manual_seed(3)
    basis = SphericalFourierBesselBasis(L, l_max=l_max, bandlimit=0.4)
    layout = MomentLayout(L, l_max, bandlimit=0.4)
    model = MomentModel(basis, layout, degree)
    a = basis.expand(random_molecule(L, g, dtype=torch.float64))
    dist = SHViewingDistribution.random(degree, generator=g)
    with torch.no_grad():
        m1, m2 = model(a, dist.coeffs)
    one = torch.ones(1, dtype=torch.float64)
    target = ImageMoments(m1, m2, one, 0 * one)
    return basis, model, target, degree, g


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn builds its generators in the default dtype
    yield
    torch.set_default_dtype(previous)


def test_sfb_coefficients_are_e3nn_irreps_in_the_permuted_frame(problem, float64_default):
    """basis.rotate / reflect == e3nn's D of P R P^T on layout.irreps(): the network needs no change of basis."""
    basis, _, _, degree, g = problem
    irreps = o3.Irreps(basis.layout.irreps())
    a = torch.randn(basis.layout.count, generator=g, dtype=torch.float64)
    for R in random_rotations(3, generator=g, dtype=torch.float64):
        D = irreps.D_from_matrix(to_e3nn_frame(R, kind="rotation"))
        torch.testing.assert_close(basis.rotate(a, R), D @ a, rtol=0, atol=1e-12)
    D = irreps.D_from_matrix(to_e3nn_frame(MIRROR_Z, kind="rotation"))
    torch.testing.assert_close(basis.reflect(a, "z"), D @ a, rtol=0, atol=1e-12)
    b = SHViewingDistribution.random(degree, generator=g).coeffs
    R = random_rotations(1, generator=g, dtype=torch.float64)[0]
    D = viewing_irreps(degree).D_from_matrix(to_e3nn_frame(R, kind="rotation"))
    torch.testing.assert_close(transform_viewing(b, degree, R), D @ b, rtol=0, atol=1e-12)


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).detach().norm() / y.detach().norm())


def test_rotating_or_mirroring_the_start_transforms_the_output(problem):
    basis, model, target, degree, g = problem
    net = MomentReconstructor(basis.layout.irreps(), degree, steps=3, channels=4).double()
    for p in net.parameters():  # e3nn initialises some weights to zero: make every path active
        p.data.normal_(0, 0.3, generator=g)

    def loss(a, b):
        return moment_loss(model, a, b, target)

    a0 = basis.expand(random_molecule(basis.L, g, dtype=torch.float64))[None] * 0.8
    b0 = SHViewingDistribution.random(degree, generator=g).coeffs[None]
    a1, b1 = net(a0, b0, loss)
    assert _rel(a1, a0) > 1e-3  # the steps do something
    for R, mirrored in [(r, False) for r in random_rotations(3, generator=g, dtype=torch.float64)] + [
        (random_rotations(1, generator=g, dtype=torch.float64)[0], True)
    ]:
        def act(a, b):
            a = basis.reflect(a, "z") if mirrored else a
            return basis.rotate(a, R), transform_viewing(b[0], degree, R, reflected=mirrored)[None]

        a_start, b_start = act(a0, b0)
        a2, b2 = net(a_start, b_start, loss)
        a_expected, b_expected = act(a1, b1)
        assert _rel(a2, a_expected) <= 1e-4
        assert _rel(b2, b_expected) <= 1e-4


def test_parameters_receive_gradients_and_b00_stays_one(problem):
    basis, model, target, degree, g = problem
    net = MomentReconstructor(basis.layout.irreps(), degree, steps=2, channels=4)
    a0 = 0.1 * torch.randn(2, basis.layout.count, generator=g, dtype=torch.float64)
    b0 = torch.stack([SHViewingDistribution.random(degree, generator=g).coeffs for _ in range(2)])
    a, b = net(a0, b0, lambda x, y: moment_loss(model, x, y, target))
    assert a.shape == a0.shape and b.shape == b0.shape and a.dtype == torch.float64
    torch.testing.assert_close(b[:, 0], torch.ones(2, dtype=torch.float64))
    sum(moment_loss(model, x, y, target) for x, y in zip(a, b)).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert sum(float(gr.abs().sum()) for gr in grads if gr is not None) > 0
