"""Image alignment: known rotations and shifts are recovered."""

from __future__ import annotations

import math

import torch

from cryo_lightning.abinitio.image_alignment import align, align_coefficients
from cryo_lightning.physics.steerable_basis import fourier_bessel_basis
from tests.abinitio.conftest import copies


def _angle_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = torch.remainder(a - b, 2 * math.pi)
    return torch.minimum(d, 2 * math.pi - d)


def test_align_recovers_known_rotation_and_shift(molecule_48):
    g = torch.Generator().manual_seed(8)
    psi = torch.cat([torch.zeros(1), 360 * torch.rand(6, generator=g)])
    shifts = torch.cat([torch.zeros(1, 2), 2.5 * (2 * torch.rand(6, 2, generator=g) - 1)])
    images = copies(molecule_48, psi, shifts)
    angles, found, scores = align(images[0], images[1:], n_angles=360, max_shift=3.0, shift_step=1.0)
    delta = torch.deg2rad(psi[1:])
    assert float(_angle_error(angles, delta).max()) < 2 * math.pi / 360  # within one angle step
    # copy j = shift(rotate(P, -delta), t): rotating by delta moves its shift to R_delta t
    c, s = torch.cos(delta), torch.sin(delta)
    t = shifts[1:]
    expected = -torch.stack([c * t[:, 0] - s * t[:, 1], s * t[:, 0] + c * t[:, 1]], dim=-1)
    assert float((found - expected).norm(dim=-1).max()) < 0.25  # a quarter of the shift grid step
    assert float(scores.min()) > 0.99
    # without shifts, the steerable-basis alignment finds the same angles
    centred = copies(molecule_48, psi)
    basis = fourier_bessel_basis(48)
    coeffs = basis.expand(centred)
    fb_angles, fb_scores = align_coefficients(coeffs[0], coeffs[1:], basis)
    assert float(_angle_error(fb_angles, delta).max()) < math.radians(0.1)
    assert float(fb_scores.min()) > 0.99
