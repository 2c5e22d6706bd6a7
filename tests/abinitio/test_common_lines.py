"""Common lines: detected angles of noise-free projections match the geometry."""

from __future__ import annotations

import math

import torch

from cryo_lightning.abinitio.common_lines import common_line_angles, detect_common_lines
from cryo_lightning.physics.projection import project
from cryo_lightning.physics.rotations import random_rotations
from cryo_lightning.physics.volumes import random_molecule


def _angle_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance between line angles modulo pi (a line and its opposite are the same line)."""
    d = torch.remainder(a - b, math.pi)
    return torch.minimum(d, math.pi - d)


def test_common_line_geometry_is_consistent():
    rotations = random_rotations(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    angles = common_line_angles(rotations)
    d = rotations[:, 2]
    for i in range(6):
        for j in range(6):
            if i == j:
                continue
            line_i = torch.stack([torch.cos(angles[i, j]), torch.sin(angles[i, j]), torch.zeros((), dtype=torch.float64)])
            line_j = torch.stack([torch.cos(angles[j, i]), torch.sin(angles[j, i]), torch.zeros((), dtype=torch.float64)])
            # both image lines map to one 3D direction, perpendicular to both viewing directions
            torch.testing.assert_close(rotations[i].T @ line_i, rotations[j].T @ line_j)
            assert abs(float(rotations[i].T @ line_i @ d[i])) < 1e-12


def test_detects_common_lines_of_noise_free_projections():
    L, N, T = 48, 8, 360
    volume = random_molecule(L, torch.Generator().manual_seed(1))
    rotations = random_rotations(N, generator=torch.Generator().manual_seed(2))
    images = project(volume, rotations)
    detected, scores = detect_common_lines(images, n_angles=T)
    truth = common_line_angles(rotations.double()).float()
    off = ~torch.eye(N, dtype=torch.bool)
    err = _angle_error(detected, truth)[off]
    step = 2 * math.pi / T
    assert float((err <= 2 * step).float().mean()) >= 0.95, torch.rad2deg(err)
    assert float(scores[off].min()) > 0.5


def test_detected_lines_of_a_pair_share_one_orientation():
    L, N = 48, 8
    volume = random_molecule(L, torch.Generator().manual_seed(1))
    rotations = random_rotations(N, generator=torch.Generator().manual_seed(2))
    detected, _ = detect_common_lines(project(volume, rotations))
    truth = common_line_angles(rotations.double()).float()
    # Either both angles of a pair equal the truth or both are flipped by pi: never one of them.
    diff = torch.remainder(detected - truth + math.pi / 2, 2 * math.pi) - math.pi / 2  # ~0 or ~pi
    flipped = diff.abs() > math.pi / 2
    off = ~torch.eye(N, dtype=torch.bool)
    assert bool((flipped == flipped.T)[off].all())
