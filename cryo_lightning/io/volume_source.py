"""One entry point for ground-truth volumes: an MRC map, an atomic model, or a random molecule."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cryo_lightning.io.atomic_model import rasterize_atomic_model, read_atomic_model
from cryo_lightning.io.errors import InputError
from cryo_lightning.io.mrc import read_map, require_cubic
from cryo_lightning.physics.volumes import random_molecule, resample_volume

__all__ = ["MAP_SUFFIXES", "MODEL_SUFFIXES", "load_volume"]

MAP_SUFFIXES = (".mrc", ".map", ".mrcs")
MODEL_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".cif.gz", ".ent.gz", ".mmcif.gz")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (*MODEL_SUFFIXES, *MAP_SUFFIXES):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def load_volume(
    source: str | os.PathLike,
    box: int,
    pixel_size: float,
    map_pixel_size: float | None = None,
    resolution: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """A ``(box, box, box)`` float32 volume at ``pixel_size`` Angstrom from any supported source.

    Args:
        source: ``"random"`` (a procedural bead molecule seeded by ``seed``), an MRC map
            (``.mrc``/``.map``; resampled by Fourier crop/pad to ``pixel_size`` and cropped or padded
            to ``box``), or an atomic model (``.pdb``/``.cif``, rasterised with Gaussian atoms).
        box: output box size in voxels.
        pixel_size: output voxel size in Angstrom.
        map_pixel_size: the map's voxel size when its header says 0 (Angstrom).
        resolution: resolution (Angstrom) of an atomic model's rasterisation; default
            ``2 * pixel_size`` (Nyquist).
        seed: seed of the random molecule.
    Returns:
        ``(box, box, box)`` float32, ``(z, y, x)``, centre at index ``box // 2``.
    """
    if str(source) == "random":
        return random_molecule(box, torch.Generator().manual_seed(int(seed)))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"volume file not found: {path} (give an MRC map, a PDB/mmCIF model or 'random')")
    kind = _suffix(path)
    if kind in MODEL_SUFFIXES:
        model = read_atomic_model(path)
        return rasterize_atomic_model(model, box, pixel_size, resolution or 2.0 * pixel_size)
    if kind in MAP_SUFFIXES:
        m = require_cubic(read_map(path))
        source_pixel = map_pixel_size or m.pixel_size
        if source_pixel is None:
            raise InputError(f"{path}: the map header has no pixel size; pass it with --map-pixel-size")
        return resample_volume(m.data, source_pixel, pixel_size, box).float()
    raise InputError(f"{path}: unknown volume format {kind!r}; use {MAP_SUFFIXES} maps or {MODEL_SUFFIXES} models")
