"""Shared pieces of the abinitio tests: exact moment problems (method of moments) and random
molecules with in-plane rotated copies of one view (class averaging)."""

from __future__ import annotations

import pytest
import torch

from cryo_lightning.abinitio.image_moments import ImageMoments, MomentLayout
from cryo_lightning.abinitio.moment_forward_model import MomentModel
from cryo_lightning.physics.fourier import ifft2c
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.projection import project_spectrum, translate_spectrum, volume_spectrum
from cryo_lightning.physics.rotations import euler_to_matrix
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


@pytest.fixture(scope="module")
def molecule_32():
    return volume_spectrum(random_molecule(32, torch.Generator().manual_seed(3)))


@pytest.fixture(scope="module")
def molecule_48():
    return volume_spectrum(random_molecule(48, torch.Generator().manual_seed(3)))


def copies(spectrum, psi_deg: torch.Tensor, shifts: torch.Tensor | None = None, ctf: torch.Tensor | None = None):
    """Projections of one view (rot 40, tilt 70) at in-plane angles ``psi_deg``, optionally shifted
    (pixels, ``(x, y)``) and CTF-affected. Raising psi by ``d`` rotates the image by ``-d`` (RELION's
    ``A = Rz(-psi) ...``), so the alignment angle that brings copy ``j`` back onto copy 0 is
    ``psi_j - psi_0``."""
    euler = torch.stack([torch.full_like(psi_deg, 40.0), torch.full_like(psi_deg, 70.0), psi_deg], dim=-1)
    spec = project_spectrum(spectrum, euler_to_matrix(euler))
    if ctf is not None:
        spec = spec * ctf
    if shifts is not None:
        spec = translate_spectrum(spec, shifts)
    return ifft2c(spec).real
