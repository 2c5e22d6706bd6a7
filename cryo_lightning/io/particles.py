"""Reading particle metadata: the one entry point for RELION STAR and cryoSPARC .cs files.

:func:`read_particles` picks the reader by extension (``io/star_reader.py``, ``io/cryosparc.py``),
both of which build an :class:`~cryo_lightning.io.particle_table.ParticleTable` (a leaf module that
imports neither), and adds the notes that concern every format (rows naming the same image).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cryo_lightning.io.cryosparc import read_cryosparc
from cryo_lightning.io.errors import InputError, path_problem
from cryo_lightning.io.particle_table import ParticleTable
from cryo_lightning.io.star_reader import read_star

__all__ = ["read_particles"]


def _note_duplicates(table: ParticleTable) -> ParticleTable:
    """Add a warning when rows name the same image (kept: a subset file may repeat a particle on
    purpose, but usually a merge of STAR files went wrong, and the copies then weigh double)."""
    df = table.particles
    repeat = df.duplicated(["stack_name", "stack_index"]).to_numpy()
    if repeat.any():
        i = int(np.flatnonzero(repeat)[0])
        first = int(np.flatnonzero((df["stack_name"] == df["stack_name"].iloc[i]).to_numpy()
                                   & (df["stack_index"] == df["stack_index"].iloc[i]).to_numpy())[0])
        rows = df["particle_id"].to_numpy()
        table.warnings.append(
            f"{table.source}: {int(repeat.sum())} particle row(s) name an image that an earlier row names too "
            f"(e.g. data rows {rows[first] + 1} and {rows[i] + 1}: image {int(df['stack_index'].iloc[i]) + 1} of "
            f"{df['stack_name'].iloc[i]}); they are kept, so those images count more than once: remove the "
            "copies (e.g. with cryol export --rows) if that is not intended")
    return table


def read_particles(
    path: str | os.PathLike,
    pixel_size: float | None = None,
    assume: Mapping[str, float] | None = None,
) -> ParticleTable:
    """Read particle metadata from a RELION ``.star`` or a cryoSPARC ``.cs`` file.

    Args:
        path: the metadata file; the format is chosen by the extension.
        pixel_size: Angstrom per pixel; overrides the file's value for every particle.
        assume: values for CTF parameters the file lacks, e.g. ``{"amplitude_contrast": 0.1}``
            (STAR only; see :func:`cryo_lightning.io.star_reader.read_star`).

    Returns:
        The :class:`ParticleTable` (validated).

    Raises:
        InputError: unknown extension, unreadable file or incomplete metadata.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    problem = path_problem(path)
    if problem:
        raise InputError(f"{path} {problem}")
    if suffix == ".star":
        return _note_duplicates(read_star(path, pixel_size=pixel_size, assume=assume))
    if suffix == ".cs":
        if assume:
            raise InputError(f"{path}: --assume applies to STAR files only; .cs files carry their CTF parameters")
        return _note_duplicates(read_cryosparc(path, pixel_size=pixel_size))
    raise InputError(
        f"{path}: unknown particle metadata format {suffix or '(no extension)'!r}; "
        "accepted: RELION .star (3.0, 3.1, 4, 5) or cryoSPARC .cs"
    )
