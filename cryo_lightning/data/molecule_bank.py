"""Banks of ground-truth volumes for synthetic data, with disjoint train/val/test molecules."""

from __future__ import annotations

from collections.abc import Sequence

import math

import numpy as np
import torch

from cryo_lightning.physics.structures import random_structure
from cryo_lightning.physics.volumes import random_molecule

__all__ = ["SPLITS", "FAMILIES", "derive_seed", "MoleculeBank"]

SPLITS = ("train", "val", "test")
# Molecule generators of a procedural bank.
FAMILIES = ("beads", "structures")


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative integers (numpy SeedSequence)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class MoleculeBank:
    """A fixed set of volumes of one split, generated (or loaded) once and cached on the CPU.

    Procedural molecules are seeded by ``(seed, split, index)``, so the train, val and test banks
    never share a molecule and a bank is the same in every process and on every rank.

    Two procedural families: ``"beads"`` (:func:`~cryo_lightning.physics.volumes.random_molecule`,
    sparse bead chains defined in pixels) and ``"structures"``
    (:func:`~cryo_lightning.physics.structures.random_structure`: globular, elongated, flat,
    hollow, multi-domain, symmetric and ribosome-like molecules in physical units). With
    ``pixel_size_range`` every molecule gets its own pixel size, log-uniform in the range and
    drawn from its seed, which the simulator then uses for its CTF (:meth:`pixel_size`).

    Args:
        box: box size ``L`` in voxels.
        split: ``"train"``, ``"val"`` or ``"test"``.
        n_molecules: number of procedural molecules (ignored when ``volumes`` is given).
        seed: base seed.
        volumes: optional ``(M, L, L, L)`` tensor or list of ``(L, L, L)`` volumes to use instead
            of procedural molecules (e.g. maps loaded by :func:`cryo_lightning.io.volume_source.load_volume`).
        family: ``"beads"`` or ``"structures"``.
        pixel_size_range: ``(low, high)`` Angstrom per pixel of the molecules, or None (the
            simulation's fixed pixel size applies).
        diameter: range of the molecules' diameter as a fraction of the box (``"structures"``).
    """

    def __init__(
        self,
        box: int,
        split: str,
        n_molecules: int = 64,
        seed: int = 0,
        volumes: torch.Tensor | Sequence[torch.Tensor] | None = None,
        family: str = "beads",
        pixel_size_range: tuple[float, float] | None = None,
        diameter: tuple[float, float] = (0.3, 0.95),
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        if pixel_size_range is not None and not 0 < pixel_size_range[0] <= pixel_size_range[1]:
            raise ValueError(f"pixel_size_range must satisfy 0 < low <= high, got {pixel_size_range}")
        self.box, self.split, self.seed = box, split, seed
        self.family, self.pixel_size_range, self.diameter = family, pixel_size_range, tuple(diameter)
        if volumes is not None:
            vols = [torch.as_tensor(v, dtype=torch.float32) for v in volumes]
            for i, v in enumerate(vols):
                if v.shape != (box, box, box):
                    raise ValueError(f"{split} volume {i} has shape {tuple(v.shape)}, expected {(box,) * 3}")
            self._volumes: list[torch.Tensor | None] = vols
        else:
            if n_molecules < 1:
                raise ValueError(f"n_molecules must be >= 1, got {n_molecules}")
            self._volumes = [None] * n_molecules

    def __len__(self) -> int:
        return len(self._volumes)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Volume ``index`` as ``(L, L, L)`` float32 on the CPU, ``(z, y, x)``, maximum 1."""
        vol = self._volumes[index]
        if vol is None:
            g = torch.Generator().manual_seed(derive_seed(self.seed, SPLITS.index(self.split), index))
            if self.family == "beads":
                vol = random_molecule(self.box, g)
            else:
                vol, _ = random_structure(self.box, self.pixel_size(index) or 4.0, g, diameter=self.diameter)
            self._volumes[index] = vol
        return vol

    def pixel_size(self, index: int) -> float | None:
        """Angstrom per pixel of molecule ``index`` (log-uniform in ``pixel_size_range``, from its
        seed), or None when the bank has no range."""
        if self.pixel_size_range is None:
            return None
        u = np.random.default_rng(derive_seed(self.seed, SPLITS.index(self.split), index, 1)).random()
        lo, hi = (math.log(p) for p in self.pixel_size_range)
        return float(math.exp(lo + (hi - lo) * u))

    def batch(self, indices: Sequence[int] | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """Volumes ``(B, L, L, L)`` for the given molecule indices, on ``device``."""
        return torch.stack([self[int(i)] for i in indices]).to(device)
