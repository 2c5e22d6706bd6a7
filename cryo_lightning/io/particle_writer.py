"""Writing particle metadata back out: STAR files for new stacks, and subsets of the original file.

Every STAR written here is RELION 3.1 (``data_optics`` + ``data_particles``). For a STAR input all
original particle columns are kept; only the image names, pixel sizes, box sizes and pixel
origins change to describe the new stack. A 3.0 input or a cryoSPARC input gets a complete optics
block built from its per-particle values.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryo_lightning.io.atomic_write import atomic_path
from cryo_lightning.io.errors import InputError
from cryo_lightning.io.particle_table import ParticleTable
from cryo_lightning.io.star import image_names, write_particles_star

__all__ = ["star_blocks_for_stack", "write_star_for_stack", "export_subset"]

_OPTICS_KEYS = {  # canonical column -> optics column
    "pixel_size_A": "rlnImagePixelSize",
    "voltage_kV": "rlnVoltage",
    "cs_mm": "rlnSphericalAberration",
    "amp_contrast": "rlnAmplitudeContrast",
}
_CANONICAL_TO_RELION = {  # for inputs without a RELION particle block (cryoSPARC)
    "defocus_u_A": "rlnDefocusU", "defocus_v_A": "rlnDefocusV", "defocus_angle_deg": "rlnDefocusAngle",
    "phase_shift_deg": "rlnPhaseShift", "ctf_bfactor_A2": "rlnCtfBfactor", "ctf_scale": "rlnCtfScalefactor",
    "rot_deg": "rlnAngleRot", "tilt_deg": "rlnAngleTilt", "psi_deg": "rlnAnglePsi",
    "shift_x_A": "rlnOriginXAngst", "shift_y_A": "rlnOriginYAngst",
    "random_subset": "rlnRandomSubset", "class_number": "rlnClassNumber",
}


def _new_optics(canon: pd.DataFrame, box: int, ctf_premultiplied: bool) -> tuple[pd.DataFrame, np.ndarray]:
    """One optics group per distinct (pixel size, voltage, Cs, Q); returns (optics, group per particle)."""
    keys = canon[list(_OPTICS_KEYS)].round(6).fillna(-1.0)
    unique, group = np.unique(keys.to_numpy(), axis=0, return_inverse=True)
    optics = pd.DataFrame({
        "rlnOpticsGroup": np.arange(1, len(unique) + 1),
        "rlnOpticsGroupName": [f"opticsGroup{i + 1}" for i in range(len(unique))],
    })
    for j, column in enumerate(_OPTICS_KEYS.values()):
        if not (unique[:, j] < 0).all():  # columns absent from the input (no CTF) stay absent
            optics[column] = unique[:, j]
    optics["rlnImageSize"] = box
    optics["rlnImageDimensionality"] = 2
    optics["rlnCtfDataAreCtfPremultiplied"] = int(ctf_premultiplied)
    return optics, group.reshape(-1) + 1


def _as_table(block: pd.DataFrame | dict | None) -> pd.DataFrame | None:
    """starfile returns a dict for a key-value block (a single optics group written without loop_)."""
    return pd.DataFrame([block]) if isinstance(block, dict) else block


def star_blocks_for_stack(
    table: ParticleTable, stack_file: str, box: int, pixel_size: np.ndarray, ctf_mode: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Optics and particles blocks describing ``table``'s particles stored in order in ``stack_file``.

    Args:
        table: the particles (original blocks kept in ``table.blocks``).
        stack_file: the new stack's name as it should appear in ``rlnImageName`` (relative to the
            STAR file's folder).
        box: the new box size.
        pixel_size: ``(n,)`` new pixel size per particle (Angstrom).
        ctf_mode: what the new images are (``"phase_flipped"`` and ``"premultiplied"`` are recorded
            as ``rlnCtfDataArePhaseFlipped`` / ``rlnCtfDataAreCtfPremultiplied`` in the optics block).
    Returns:
        ``(optics, particles)`` DataFrames.
    """
    canon = table.particles.reset_index(drop=True)
    n = len(canon)
    scale = canon["pixel_size_A"].to_numpy() / np.asarray(pixel_size, dtype=np.float64)  # old / new
    out_canon = canon.copy()
    out_canon["pixel_size_A"] = np.asarray(pixel_size, dtype=np.float64)
    premultiplied = bool(canon["ctf_premultiplied"].any())

    if table.format.startswith("relion"):
        particles = table.blocks[table.particle_block].reset_index(drop=True).copy()
    else:
        particles = pd.DataFrame({"rlnImageOriginalName": canon["image_name"].to_numpy()})
        for src, dst in _CANONICAL_TO_RELION.items():
            values = canon[src].to_numpy()
            if not np.isnan(values.astype(float)).all():
                particles[dst] = values
    particles["rlnImageName"] = image_names(stack_file, n)

    optics_in = _as_table(table.blocks.get("optics"))
    if optics_in is not None and "rlnOpticsGroup" in particles:
        used = np.unique(particles["rlnOpticsGroup"].to_numpy())
        optics = optics_in[optics_in["rlnOpticsGroup"].isin(used)].reset_index(drop=True).copy()
        groups = particles["rlnOpticsGroup"].to_numpy()
        for i, group in enumerate(optics["rlnOpticsGroup"]):
            members = groups == group
            optics.loc[i, "rlnImagePixelSize"] = float(np.median(out_canon["pixel_size_A"].to_numpy()[members]))
            # Values the reader had to assume (--assume) are written, so the output reads back.
            for src, column in _OPTICS_KEYS.items():
                if column not in optics_in and column not in particles:
                    value = out_canon[src].to_numpy()[members]
                    if not np.isnan(value).all():
                        optics.loc[i, column] = float(np.nanmedian(value))
        optics["rlnImageSize"] = box
        optics["rlnImageDimensionality"] = 2
    else:
        optics, group = _new_optics(out_canon, box, premultiplied)
        particles["rlnOpticsGroup"] = group

    if ctf_mode == "phase_flipped":
        optics["rlnCtfDataArePhaseFlipped"] = 1
    elif ctf_mode == "premultiplied":
        optics["rlnCtfDataAreCtfPremultiplied"] = 1

    # Pixel-unit columns must describe the new pixels; Angstrom columns are unchanged.
    for column in ("rlnOriginX", "rlnOriginY"):
        if column in particles:
            particles[column] = particles[column].to_numpy(dtype=float) * scale
    if "rlnOriginXAngst" not in particles and "rlnOriginX" in particles:
        particles["rlnOriginXAngst"] = canon["shift_x_A"].to_numpy()
        particles["rlnOriginYAngst"] = canon["shift_y_A"].to_numpy()
    if "rlnImagePixelSize" in particles:
        particles["rlnImagePixelSize"] = out_canon["pixel_size_A"].to_numpy()
    if "rlnMagnification" in particles and "rlnDetectorPixelSize" in particles:
        particles["rlnMagnification"] = particles["rlnDetectorPixelSize"].to_numpy(dtype=float) * 1e4 / out_canon["pixel_size_A"].to_numpy()
    if "rlnImageSize" in particles:
        particles["rlnImageSize"] = box
    return optics, particles


def write_star_for_stack(
    table: ParticleTable,
    star_path: str | os.PathLike,
    stack_path: str | os.PathLike,
    box: int,
    pixel_size: np.ndarray,
    overwrite: bool = False,
    ctf_mode: str | None = None,
) -> Path:
    """Write the RELION 3.1 STAR for a new stack holding ``table``'s particles in order.

    ``rlnImageName`` points at ``stack_path`` relative to the STAR's folder when possible.
    """
    star_path, stack_path = Path(star_path), Path(stack_path)
    try:
        name = os.path.relpath(stack_path, star_path.parent)
    except ValueError:  # different drives
        name = str(stack_path)
    optics, particles = star_blocks_for_stack(table, name, box, pixel_size, ctf_mode)
    return write_particles_star(star_path, optics, particles, overwrite=overwrite)


def export_subset(
    table: ParticleTable, rows: np.ndarray, out_path: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write the given rows of the *original* metadata file (STAR or .cs) to ``out_path``.

    STAR: every block is kept, the particle block is filtered to ``rows`` (in that order) and the
    optics block keeps only the groups still used. cryoSPARC: the structured array is filtered.
    Image names still point at the original stacks.
    """
    out_path = Path(out_path)
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(table)):
        raise InputError(f"{table.source}: subset rows must be in [0, {len(table) - 1}]")
    if out_path.resolve() == Path(table.source).resolve():
        raise InputError(f"{out_path}: refusing to overwrite the input file; choose another --out")
    ids = table.particles["particle_id"].to_numpy()[rows]
    if table.format == "cryosparc":
        if out_path.suffix != ".cs":
            raise InputError(f"{out_path}: a subset of a cryoSPARC file is written as .cs")
        data = np.load(table.source)[ids]
        with atomic_path(out_path, overwrite) as tmp, open(tmp, "wb") as f:
            np.save(f, data)
        return out_path
    blocks = {k: v for k, v in table.blocks.items()}
    particles = table.blocks[table.particle_block].iloc[rows].reset_index(drop=True)
    blocks[table.particle_block] = particles
    if "optics" in blocks and "rlnOpticsGroup" in particles:
        optics = _as_table(blocks["optics"])
        blocks["optics"] = optics[optics["rlnOpticsGroup"].isin(particles["rlnOpticsGroup"].unique())].reset_index(drop=True)
    import starfile  # local: only this path writes arbitrary block layouts

    with atomic_path(out_path, overwrite) as tmp:
        starfile.write(blocks, tmp, float_format="%.6f")
    return out_path
