"""Writing RELION 3.1+ particle STAR files (optics + particles blocks) with the starfile package.

Reading every STAR layout (3.0, 3.1/4, 5) comes with the data-layer work; this module holds what
simulation needs: a complete optics block, RELION image names and an atomic write.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import starfile

from cryo_lightning.io.atomic_write import atomic_path

__all__ = ["image_names", "optics_block", "write_particles_star"]


def image_names(stack: str, n: int, start: int = 0) -> list[str]:
    """RELION ``rlnImageName`` values ``000001@stack.mrcs`` (1-based, 6-digit padding)."""
    return [f"{i + 1:06d}@{stack}" for i in range(start, start + n)]


def optics_block(
    pixel_size: float,
    box: int,
    voltage: float,
    cs: float,
    amplitude_contrast: float,
    group_name: str = "opticsGroup1",
) -> pd.DataFrame:
    """A one-group ``data_optics`` table with every column RELION needs to read particles."""
    return pd.DataFrame({
        "rlnOpticsGroup": [1],
        "rlnOpticsGroupName": [group_name],
        "rlnAmplitudeContrast": [float(amplitude_contrast)],
        "rlnSphericalAberration": [float(cs)],
        "rlnVoltage": [float(voltage)],
        "rlnImagePixelSize": [float(pixel_size)],
        "rlnImageSize": [int(box)],
        "rlnImageDimensionality": [2],
        "rlnCtfDataAreCtfPremultiplied": [0],
    })


def write_particles_star(
    path: str | os.PathLike,
    optics: pd.DataFrame,
    particles: pd.DataFrame,
    overwrite: bool = False,
    extra_blocks: Mapping[str, pd.DataFrame] | None = None,
) -> Path:
    """Write a RELION 3.1 STAR file (``data_optics`` then ``data_particles``) atomically.

    Args:
        path: output ``.star`` file.
        optics: the optics table (see :func:`optics_block`).
        particles: one row per particle; must hold ``rlnImageName`` and ``rlnOpticsGroup``.
        overwrite: replace an existing file.
        extra_blocks: further blocks written after the particles.
    Returns:
        The written path.
    """
    for column in ("rlnImageName", "rlnOpticsGroup"):
        if column not in particles:
            raise ValueError(f"particles table for {path} lacks the required column {column}")
    blocks = {"optics": optics, "particles": particles, **(extra_blocks or {})}
    with atomic_path(path, overwrite) as tmp:
        starfile.write(blocks, tmp, float_format="%.6f")
    return Path(path)
