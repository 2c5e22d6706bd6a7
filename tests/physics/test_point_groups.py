from __future__ import annotations

import numpy as np
import pytest

from cryo_lightning.physics.point_groups import group_order, point_group


@pytest.mark.parametrize("name, order", [("C1", 1), ("C2", 2), ("C7", 7), ("D2", 4), ("D7", 14),
                                         ("T", 12), ("O", 24), ("I", 60)])
def test_group_orders(name, order):
    assert group_order(name) == order


@pytest.mark.parametrize("name", ["C5", "D3", "T", "O", "I"])
def test_elements_are_rotations_and_the_set_is_closed(name):
    G = point_group(name)
    assert np.allclose(G[0], np.eye(3))
    assert np.allclose(np.einsum("nij,nkj->nik", G, G), np.eye(3), atol=1e-10)
    assert np.allclose(np.linalg.det(G), 1.0)
    products = np.einsum("aij,bjk->abik", G, G).reshape(-1, 3, 3)
    # every product is an element of the group
    dist = np.abs(products[:, None] - G[None]).max(axis=(-1, -2)).min(1)
    assert dist.max() < 1e-8


def test_conventions_principal_axis_z_and_dihedral_two_fold_x():
    c4 = point_group("C4")
    assert np.allclose(c4 @ np.array([0, 0, 1.0]), [0, 0, 1.0])
    d2 = point_group("D2")
    flips = [g for g in d2 if np.allclose(g @ np.array([1.0, 0, 0]), [1.0, 0, 0]) and not np.allclose(g, np.eye(3))]
    assert len(flips) == 1
    # the icosahedral group in the 2-2-2 setting has a five-fold along (0, 1, phi)
    phi = (1 + 5**0.5) / 2
    axis = np.array([0.0, 1.0, phi]) / np.linalg.norm([0.0, 1.0, phi])
    fixed = [g for g in point_group("I") if np.allclose(g @ axis, axis)]
    assert len(fixed) == 5


def test_unknown_group_is_refused():
    with pytest.raises(ValueError, match="unknown point group"):
        point_group("X3")
