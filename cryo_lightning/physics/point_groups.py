"""Rotation matrices of the crystallographic and molecular point groups Cn, Dn, T, O and I.

Used to build symmetric assemblies for synthetic training molecules. The axes follow the
common cryo-EM choice: the principal n-fold axis of Cn and Dn along z and a two-fold of Dn along
x; T and O with their two- and four-folds along x, y, z and three-folds along the cube
diagonals; I with two-folds along x, y, z (the 2-2-2 setting). Matrices act on ``(x, y, z)``
column vectors.
"""

from __future__ import annotations

import math
import re

import numpy as np

__all__ = ["point_group", "group_order"]


def _axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Active right-handed rotation by ``angle`` radians about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def _closure(generators: list[np.ndarray], max_order: int = 60) -> np.ndarray:
    """All products of the generators: ``(n, 3, 3)``, identity first."""
    elements = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in generators:
                p = h @ g
                if not any(np.abs(p - e).max() < 1e-8 for e in elements):
                    elements.append(p)
                    new.append(p)
        if len(elements) > max_order:
            raise RuntimeError("point-group closure did not terminate")  # pragma: no cover
        frontier = new
    return np.stack(elements)


def group_order(name: str) -> int:
    """Number of rotations of the group ``name`` (``C1``, ``C7``, ``D3``, ``T``, ``O``, ``I``)."""
    return len(point_group(name))


def point_group(name: str) -> np.ndarray:
    """The rotations of a point group, ``(n, 3, 3)`` float64, identity first.

    Args:
        name: ``Cn`` or ``Dn`` with ``n >= 1`` (e.g. ``C4``, ``D2``), or ``T``, ``O``, ``I``
            (case-insensitive).
    Raises:
        ValueError: for any other name.
    """
    key = name.strip().upper()
    z, x = np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0])
    diagonal = np.array([1.0, 1.0, 1.0])
    match = re.fullmatch(r"([CD])(\d+)", key)
    if match:
        n = int(match.group(2))
        if n < 1:
            raise ValueError(f"point group {name!r}: n must be >= 1")
        gens = [_axis_rotation(z, 2 * math.pi / n)]
        if match.group(1) == "D":
            gens.append(_axis_rotation(x, math.pi))
        return _closure(gens, max_order=2 * n)
    if key == "T":
        return _closure([_axis_rotation(z, math.pi), _axis_rotation(diagonal, 2 * math.pi / 3)], 12)
    if key == "O":
        return _closure([_axis_rotation(z, math.pi / 2), _axis_rotation(diagonal, 2 * math.pi / 3)], 24)
    if key == "I":
        phi = (1 + math.sqrt(5)) / 2
        # In the 2-2-2 setting a five-fold axis lies along (0, 1, phi).
        return _closure([_axis_rotation(z, math.pi), _axis_rotation(diagonal, 2 * math.pi / 3),
                         _axis_rotation(np.array([0.0, 1.0, phi]), 2 * math.pi / 5)], 60)
    raise ValueError(f"unknown point group {name!r}: use Cn, Dn (n >= 1), T, O or I")
