"""Reading atomic models (PDB, mmCIF) with gemmi and rasterising them into density maps."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gemmi
import torch

from cryo_lightning.io.errors import InputError
from cryo_lightning.physics.volumes import gaussian_density

__all__ = ["AtomicModel", "read_atomic_model", "rasterize_atomic_model"]


@dataclass
class AtomicModel:
    """Atoms of one model of a structure.

    Attributes:
        coords: ``(n, 3)`` float32 positions in Angstrom, ``(x, y, z)`` order (file frame).
        atomic_numbers: ``(n,)`` int64.
        weights: ``(n,)`` float32 scattering weight per atom: the atomic number (electron
            count of the neutral atom).
        path: the file read.
    """

    coords: torch.Tensor
    atomic_numbers: torch.Tensor
    weights: torch.Tensor
    path: Path


def read_atomic_model(
    path: str | os.PathLike,
    keep_hydrogens: bool = False,
    keep_waters: bool = False,
) -> AtomicModel:
    """Read the first model of a PDB or mmCIF file (format chosen by gemmi from the file).

    Only the first alternative conformation of each atom is kept. Atoms of unknown element
    are dropped.

    Args:
        path: ``.pdb``, ``.ent``, ``.cif``/``.mmcif`` (optionally gzipped).
        keep_hydrogens: keep hydrogen and deuterium atoms (dropped by default: they are
            usually absent from experimental models and add little density).
        keep_waters: keep water molecules.
    Returns:
        :class:`AtomicModel`.
    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: gemmi cannot parse the file, or it holds no (kept) atoms.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"atomic model file not found: {path}")
    try:
        structure = gemmi.read_structure(str(path))
    except Exception as err:  # gemmi raises RuntimeError or ValueError on bad input
        raise InputError(f"cannot read atomic model {path}: {err}") from err
    if len(structure) == 0 or structure[0].count_atom_sites() == 0:
        raise InputError(f"atomic model {path} contains no atoms (is it a PDB/mmCIF file?)")
    structure.remove_alternative_conformations()
    coords: list[tuple[float, float, float]] = []
    numbers: list[int] = []
    for chain in structure[0]:
        for residue in chain:
            if residue.is_water() and not keep_waters:
                continue
            for atom in residue:
                if atom.is_hydrogen() and not keep_hydrogens:
                    continue
                z = atom.element.atomic_number
                if z == 0:
                    continue
                coords.append((atom.pos.x, atom.pos.y, atom.pos.z))
                numbers.append(z)
    if not coords:
        raise InputError(
            f"atomic model {path} has no atoms left after removing hydrogens/waters "
            f"(keep_hydrogens={keep_hydrogens}, keep_waters={keep_waters})"
        )
    atomic_numbers = torch.tensor(numbers, dtype=torch.int64)
    return AtomicModel(
        coords=torch.tensor(coords, dtype=torch.float32),
        atomic_numbers=atomic_numbers,
        weights=atomic_numbers.to(torch.float32),
        path=path,
    )


def rasterize_atomic_model(
    model: AtomicModel,
    L: int,
    pixel_size: float,
    resolution_A: float,
    center: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Density map of an atomic model: one Gaussian per atom (see :func:`gaussian_density`).

    Args:
        model: atoms from :func:`read_atomic_model`.
        L: box size in voxels.
        pixel_size: voxel size in Angstrom.
        resolution_A: resolution in Angstrom; Gaussian sigma ``= resolution / (pi sqrt 2)``.
        center: put the weighted centre of mass at the box centre (index ``L // 2``);
            otherwise the model's coordinate origin sits there.
        device: where to compute (default CPU).
    Returns:
        ``(L, L, L)`` float32 density per cubic Angstrom (electrons / A^3), ``(z, y, x)``.
    """
    return gaussian_density(
        model.coords.to(device),
        model.weights.to(device),
        L,
        pixel_size,
        resolution_A,
        center=center,
    )
