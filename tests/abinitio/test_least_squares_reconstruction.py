"""CG least-squares reconstruction: converges on noise-free data, half maps agree."""

from __future__ import annotations

import torch

from cryo_lightning.abinitio.least_squares_reconstruction import forward_operator, reconstruct, reconstruct_half_sets
from cryo_lightning.physics.ctf import ctf_2d, random_ctf_params
from cryo_lightning.physics.fourier import fourier_shell_correlation
from cryo_lightning.physics.rotations import random_rotations
from cryo_lightning.physics.volumes import random_molecule


def _data(n: int, L: int = 16, with_ctf: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    volume = random_molecule(L, torch.Generator().manual_seed(3))
    rotations = random_rotations(n, generator=g)
    ctf = ctf_2d(random_ctf_params(n, generator=g, defocus_range=(10000, 20000)), L, 6.0) if with_ctf else None
    origins = (torch.rand(n, 2, generator=g) - 0.5) * 2
    return volume, rotations, ctf, origins, forward_operator(volume, rotations, ctf, origins)


def test_cg_converges_on_noise_free_data():
    volume, rotations, _, origins, images = _data(300)
    result = reconstruct(images, rotations, origins=origins, lam=1e-4, iterations=40)
    assert result.residuals[-1] < 0.05 * result.residuals[0]
    rel = float((result.volume - volume).norm() / volume.norm())
    assert rel < 0.05, rel
    fsc = fourier_shell_correlation(result.volume, volume, 3)
    assert float(fsc[1:8].min()) > 0.98  # up to 7/8 of Nyquist


def test_cg_with_ctf_and_half_maps():
    volume, rotations, ctf, origins, images = _data(400, with_ctf=True, seed=1)
    subsets = torch.arange(400) % 2 + 1
    half1, half2, fsc = reconstruct_half_sets(images, rotations, subsets, ctf, origins, lam=1e-3, iterations=30)
    assert fsc.shape == (9,) and float(fsc[1:5].min()) > 0.9
    truth_fsc = fourier_shell_correlation((half1 + half2) / 2, volume, 3)
    assert float(truth_fsc[1:5].min()) > 0.9
