"""Shared fixtures of the class-averaging tests: random molecules and in-plane rotated copies of one view."""

from __future__ import annotations

import pytest
import torch

from cryo_lightning.physics.fourier import ifft2c
from cryo_lightning.physics.projection import project_spectrum, translate_spectrum, volume_spectrum
from cryo_lightning.physics.rotations import euler_to_matrix
from cryo_lightning.physics.volumes import random_molecule


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
