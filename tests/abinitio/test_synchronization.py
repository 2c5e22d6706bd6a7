"""Synchronization voting: exact from exact common lines, robust to wrong ones, end to end."""

from __future__ import annotations

import math

import torch

from cryo_lightning.abinitio.common_lines import common_line_angles, detect_common_lines
from cryo_lightning.abinitio.synchronization import estimate_rotations, sync_matrix
from cryo_lightning.physics.projection import project
from cryo_lightning.physics.rotations import random_rotations, register_rotations
from cryo_lightning.physics.volumes import random_molecule


def _rotations(n: int, seed: int = 0) -> torch.Tensor:
    return random_rotations(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sync_matrix_blocks_are_relative_rotations():
    rotations = _rotations(12)
    d = rotations[:, 2]
    S = sync_matrix(common_line_angles(rotations), d @ d.T)
    W = rotations[:, :2].reshape(24, 3)  # block row i = the first two rows of A_i
    torch.testing.assert_close(S, W @ W.T)


def test_sync_of_exact_common_lines_is_exact():
    rotations = _rotations(40)
    result = estimate_rotations(common_line_angles(rotations))
    d = rotations[:, 2]
    torch.testing.assert_close(result.cosines, d @ d.T, atol=1e-12, rtol=0)
    reg = register_rotations(result.rotations, rotations)
    assert reg.mean_error < 1e-6, reg.mean_error
    assert float(result.eigenvalues[3] / result.eigenvalues[2]) < 1e-9  # rank 3


def test_voting_rejects_wrong_common_lines():
    rotations = _rotations(60, seed=1)
    angles = common_line_angles(rotations)
    g = torch.Generator().manual_seed(2)
    wrong = torch.triu(torch.rand(60, 60, generator=g, dtype=torch.float64) < 0.2, 1)
    wrong = wrong | wrong.T
    angles = torch.where(wrong, torch.rand(60, 60, generator=g, dtype=torch.float64) * 2 * math.pi, angles)
    result = estimate_rotations(angles)
    d = rotations[:, 2]
    good = ~wrong
    # Pairs with correct lines get the right angle from the majority of third images ...
    err = (torch.arccos(result.cosines.clamp(-1, 1)) - torch.arccos((d @ d.T).clamp(-1, 1))).abs()[good]
    assert float(torch.rad2deg(err).median()) < 2.0
    assert float(result.support[good].median()) > 2 * float(result.support[wrong].median())
    # ... and 20% wrong lines cost a few degrees, not the solution; support weights help.
    weighted = register_rotations(result.rotations, rotations).mean_error
    plain = register_rotations(estimate_rotations(angles, weighted=False).rotations, rotations).mean_error
    assert weighted < 3.0 and weighted < 0.7 * plain, (weighted, plain)


def test_rotations_from_noise_free_projections():
    L, N = 32, 80
    volume = random_molecule(L, torch.Generator().manual_seed(1))
    rotations = _rotations(N, seed=3).float()
    angles, scores = detect_common_lines(project(volume, rotations))
    reg = register_rotations(estimate_rotations(angles).rotations.double(), rotations.double())
    assert reg.mean_error < 1.0, reg.mean_error
