from __future__ import annotations

import numpy as np
import pytest
import torch

from cryo_lightning.physics.point_groups import point_group
from cryo_lightning.physics.structures import STRUCTURE_FAMILIES, random_structure


def _extent(vol: torch.Tensor, threshold: float = 0.05) -> float:
    """Largest distance (pixels) between two voxels above ``threshold`` of the maximum, along x, y, z."""
    idx = torch.nonzero(vol > threshold * vol.max()).double()
    return float((idx.max(0).values - idx.min(0).values).max())


@pytest.mark.parametrize("family", STRUCTURE_FAMILIES)
def test_every_family_renders_a_centred_molecule_of_the_requested_size(family):
    L = 48
    for seed in range(2):
        vol, info = random_structure(L, 4.0, torch.Generator().manual_seed(seed), family=family, diameter=(0.5, 0.7))
        assert vol.shape == (L, L, L) and vol.dtype == torch.float32
        assert torch.isfinite(vol).all() and vol.min() >= 0 and vol.max() == pytest.approx(1.0)
        assert info["family"] == family
        # the molecule spans roughly its diameter and fits in the box with a margin
        assert 0.3 * L < _extent(vol) < 0.9 * L
        # centred: the centre of mass is within 2 pixels of L // 2 (the bead chains of
        # random_molecule are centred on their containing sphere instead: within 0.1 L)
        z, y, x = torch.meshgrid(*(torch.arange(L, dtype=torch.float64) - L // 2,) * 3, indexing="ij")
        w = vol.double() / vol.double().sum()
        com = torch.stack([(w * c).sum() for c in (x, y, z)])
        assert com.abs().max() < (0.1 * L if family == "chain" else 2.0)


def test_deterministic_given_the_generator_and_different_across_seeds():
    a, _ = random_structure(32, 6.0, torch.Generator().manual_seed(3))
    b, _ = random_structure(32, 6.0, torch.Generator().manual_seed(3))
    c, _ = random_structure(32, 6.0, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_symmetric_assembly_is_invariant_under_its_group():
    """Resampling the volume by a group element reproduces it (up to rasterisation)."""
    from scipy.ndimage import affine_transform

    for seed in range(40):
        vol, info = random_structure(40, 5.0, torch.Generator().manual_seed(seed), family="symmetric")
        if info["group"][0] in "CD" and int(info["group"][1:]) in (2, 4):
            break
    L, v = 40, vol.double().numpy()
    # The assembly is built in its own frame and recentred on its centre of mass, which lies on
    # the symmetry axes; the frame is the lab frame (no global rotation is applied).
    for g in point_group(info["group"])[1:]:
        # volume index order is (z, y, x): conjugate the (x, y, z) rotation by the axis flip
        P = np.eye(3)[::-1]
        M = P @ g @ P
        c = np.full(3, L // 2, dtype=float)
        rotated = affine_transform(v, M.T, offset=c - M.T @ c, order=1)
        corr = (rotated * v).sum() / np.sqrt((rotated**2).sum() * (v**2).sum())
        assert corr > 0.97, (info, corr)


def test_complex_family_has_a_dense_core():
    vol, info = random_structure(48, 5.0, torch.Generator().manual_seed(1), family="complex", diameter=(0.8, 0.9))
    assert info["core_density"] >= 1.5
    inner = vol[vol > 0.05].double()
    # a dense core makes the density distribution inside the molecule broad (protein + RNA levels)
    assert float(inner.quantile(0.95) / inner.quantile(0.5)) > 1.6


def test_bad_arguments_are_refused():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="pixel_size"):
        random_structure(32, -1.0, g)
    with pytest.raises(ValueError, match="diameter"):
        random_structure(32, 4.0, g, diameter=(0.5, 1.2))
    with pytest.raises(ValueError, match="family"):
        random_structure(32, 4.0, g, family="virus")


@pytest.mark.parametrize("L", [16, 24, 32])
@pytest.mark.parametrize("family", STRUCTURE_FAMILIES)
def test_small_boxes_and_small_molecules_render(family, L):
    """Issue 23's L = 32 training drew a chain molecule of diameter 0.3 L that random_molecule
    could not fit (ValueError after 158 steps); every family renders at the smallest diameter."""
    for seed in range(3):
        vol, _ = random_structure(L, 6.0, torch.Generator().manual_seed(seed), family=family, diameter=(0.3, 0.3))
        assert vol.shape == (L, L, L) and torch.isfinite(vol).all() and vol.max() > 0
