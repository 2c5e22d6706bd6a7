"""Reading cryoSPARC ``.cs`` particle files (numpy structured arrays) into the canonical table.

Field map (cryoSPARC -> RELION meaning; see docs/conventions.md):

- ``blob/path`` (bytes; a leading ``>`` marks imported data and is dropped), ``blob/idx``
  (0-based) -> ``stack_name``, ``stack_index``; ``image_name = f"{idx + 1:06d}@{path}"``.
- ``blob/shape`` ``[ny, nx]`` -> ``box_px``; ``blob/psize_A`` -> pixel size; ``blob/sign`` ->
  ``data_sign`` (cryoSPARC keeps the raw, dark-protein contrast: -1).
- ``ctf/df1_A``, ``ctf/df2_A``, ``ctf/df_angle_rad``, ``ctf/phase_shift_rad`` (radians ->
  degrees), ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``, ``ctf/bfactor``, ``ctf/scale``;
  ``ctf/exp_group_id`` (0-based) -> ``optics_group = id + 1``.
- ``alignments3D/pose``: axis-angle vector ``r`` (radians); RELION's pose matrix is
  ``A = expmap(r)^T`` (cryoDRGN's ``parse_pose_csparc``), converted to Euler angles.
  ``alignments2D/pose``: in-plane angle (radians) -> ``psi`` only.
- ``alignments*/shift``: pixels at ``alignments*/psize_A``, same sign as ``rlnOriginX/Y``.
- ``alignments*/split`` -> ``random_subset = split + 1``; ``alignments*/class`` ->
  ``class_number = class + 1``; ``location/micrograph_path`` -> ``micrograph_name``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cryo_lightning.io.errors import InputError
from cryo_lightning.io.particle_table import ParticleTable, canonical_frame, clean_stack_names
from cryo_lightning.physics.rotations import matrix_to_euler, rotvec_to_matrix

__all__ = ["read_cryosparc", "flatten_fields"]

_REQUIRED_CTF_FIELDS = ("ctf/df1_A", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast")


def flatten_fields(data: np.ndarray, path: str | os.PathLike = "the .cs file") -> pd.DataFrame:
    """A ``.cs`` structured array as a DataFrame, one column per scalar field.

    Vector fields become ``name_0, name_1, ...`` (e.g. ``ctf/anisomag_0..3``); byte strings are
    decoded (UTF-8); numeric dtypes (``uid`` uint64, ...) are kept.
    """
    columns: dict[str, Any] = {}
    for name in data.dtype.names or ():
        values = data[name]
        if values.dtype.kind == "S":
            columns[name] = pd.Series(_decode(values, path, name), dtype=str)
        elif values.ndim == 1:
            columns[name] = values
        else:
            flat = values.reshape(len(values), math.prod(values.shape[1:]))
            for j in range(flat.shape[1]):
                columns[f"{name}_{j}"] = flat[:, j]
    return pd.DataFrame(columns, index=pd.RangeIndex(len(data)))


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # a damaged .npy header gives ValueError, SyntaxError, tokenize.TokenError, ...
        raise InputError(f"{path}: cannot be read as a cryoSPARC .cs file ({type(err).__name__}: {err})") from err
    if not isinstance(data, np.ndarray) or data.dtype.names is None or data.ndim != 1:
        raise InputError(f"{path}: not a cryoSPARC .cs file (expected a 1-D numpy structured array)")
    return data


def _decode(values: np.ndarray, path: str | os.PathLike, field: str) -> np.ndarray:
    """Byte strings of a field as text, or an InputError naming the field and the first bad row."""
    try:
        return np.char.decode(values, "utf-8")
    except UnicodeDecodeError:
        for row, value in enumerate(values):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}: field {field} of row {row + 1} is not UTF-8 text ({value[:40]!r}); "
                                 "the file is damaged: export it again from cryoSPARC") from None
        raise


def _alignment_prefix(names: tuple[str, ...]) -> str | None:
    """``alignments3D`` if present (3D poses win), else ``alignments2D``, else None."""
    for prefix in ("alignments3D", "alignments2D"):
        if f"{prefix}/pose" in names:
            return prefix
    return None


def read_cryosparc(path: str | os.PathLike, pixel_size: float | None = None) -> ParticleTable:
    """Read a cryoSPARC particle ``.cs`` file.

    Pixel size: the ``pixel_size`` argument, else ``blob/psize_A``. A file with no ``ctf/*``
    fields has no CTF (``has_ctf`` False, CTF columns NaN, a warning); otherwise
    ``ctf/df1_A``, ``ctf/accel_kv``, ``ctf/cs_mm`` and ``ctf/amp_contrast`` are required. A file
    without ``blob/sign`` gets ``data_sign = -1`` (cryoSPARC's raw contrast), with a warning. A
    0-row file gives an empty table. See the module docstring for the field map.

    Args:
        path: the ``.cs`` file.
        pixel_size: Angstrom per pixel for every particle, overriding ``blob/psize_A``.

    Returns:
        A validated :class:`ParticleTable` with ``format == "cryosparc"`` and
        ``blocks == {"particles": flatten_fields(data)}``.

    Raises:
        InputError: unreadable file, or a required field missing; the message names the file.
    """
    path = Path(path)
    data = _load(path)
    names = data.dtype.names or ()
    n = len(data)
    warnings: list[str] = []
    columns: dict[str, Any] = {}
    common = dict(
        source=path, format="cryosparc", blocks={"particles": flatten_fields(data, path)}, particle_block="particles"
    )

    if pixel_size is not None and not (math.isfinite(pixel_size) and pixel_size > 0):
        raise InputError(f"--pixel-size {pixel_size}: must be a positive number of Angstrom per pixel")
    has_ctf = any(name.startswith("ctf/") for name in names)
    if n == 0:
        table = ParticleTable(
            particles=canonical_frame(
                {"image_name": [], "stack_name": [], "stack_index": [], "optics_group": [], "pixel_size_A": []}, 0
            ),
            pixel_size_source="--pixel-size override" if pixel_size is not None else "none (0 particles)",
            has_ctf=has_ctf,
            warnings=[f"{path}: the file holds 0 particles"],
            **common,
        )
        table.validate()
        return table

    for field in ("blob/path", "blob/idx"):
        if field not in names:
            raise InputError(
                f"{path}: no {field} field, so the particle images cannot be found; use the job's particles "
                "file (e.g. J24_particles.cs or an exported particles .cs), not a passthrough file"
            )
    stack = clean_stack_names(pd.Series(_decode(data["blob/path"], path, "blob/path"), dtype=str))
    index = data["blob/idx"].astype(np.int64)
    columns["stack_name"] = stack
    columns["stack_index"] = index
    columns["image_name"] = pd.Series(index + 1).astype(str).str.zfill(6) + "@" + stack

    if pixel_size is not None:
        pixel = np.full(n, float(pixel_size))
        source = "--pixel-size override"
    elif "blob/psize_A" in names:
        pixel = data["blob/psize_A"].astype(np.float64)
        source = "blob/psize_A"
    else:
        raise InputError(f"{path}: no blob/psize_A field; pass --pixel-size (Angstrom per pixel of the images)")
    columns["pixel_size_A"] = pixel

    if "blob/shape" in names:
        shape = data["blob/shape"].reshape(n, -1).astype(np.int64)
        if (shape[:, 0] != shape[:, -1]).any():
            i = int(np.flatnonzero(shape[:, 0] != shape[:, -1])[0])
            raise InputError(
                f"{path}: blob/shape of row {i + 1} is {shape[i].tolist()}; particle images must be square"
            )
        columns["box_px"] = shape[:, -1]
    if "blob/sign" in names:
        columns["data_sign"] = np.where(data["blob/sign"] < 0, -1, 1)
    else:
        columns["data_sign"] = -1
        warnings.append(f"{path}: no blob/sign; assuming cryoSPARC's raw contrast (dark protein, data_sign -1)")
    columns["optics_group"] = data["ctf/exp_group_id"].astype(np.int64) + 1 if "ctf/exp_group_id" in names else 1

    if has_ctf:
        missing = [f for f in _REQUIRED_CTF_FIELDS if f not in names]
        if missing:
            raise InputError(
                f"{path}: incomplete CTF: missing field(s) {', '.join(missing)}; export the particles from a "
                "job downstream of CTF estimation (e.g. Patch CTF, Extract, or a refinement)"
            )
        columns.update(_ctf_columns(data, names, path, warnings))
    else:
        warnings.append(f"{path}: no ctf/* fields; the CTF is not modelled")

    columns.update(_alignment_columns(data, names, pixel))
    if "location/micrograph_path" in names:
        columns["micrograph_name"] = pd.Series(_decode(data["location/micrograph_path"], path, "location/micrograph_path"), dtype=str)

    table = ParticleTable(
        particles=canonical_frame(columns, n),
        pixel_size_source=source,
        has_ctf=has_ctf,
        warnings=warnings,
        **common,
    )
    table.validate()
    return table


def _ctf_columns(data: np.ndarray, names: tuple[str, ...], path: Path, warnings: list[str]) -> dict[str, Any]:
    def field(name: str, default: float) -> np.ndarray | float:
        return data[name].astype(np.float64) if name in names else default

    df1 = data["ctf/df1_A"].astype(np.float64)
    if "ctf/df2_A" not in names:
        warnings.append(f"{path}: no ctf/df2_A; using ctf/df1_A (no astigmatism)")
    if "ctf/df_angle_rad" not in names:
        warnings.append(f"{path}: no ctf/df_angle_rad; using 0")
    return {
        "voltage_kV": data["ctf/accel_kv"].astype(np.float64),
        "cs_mm": data["ctf/cs_mm"].astype(np.float64),
        "amp_contrast": data["ctf/amp_contrast"].astype(np.float64),
        "defocus_u_A": df1,
        "defocus_v_A": field("ctf/df2_A", df1),
        "defocus_angle_deg": np.degrees(field("ctf/df_angle_rad", 0.0)),
        "phase_shift_deg": np.degrees(field("ctf/phase_shift_rad", 0.0)),
        "ctf_bfactor_A2": field("ctf/bfactor", 0.0),
        "ctf_scale": field("ctf/scale", 1.0),
    }


def _alignment_columns(data: np.ndarray, names: tuple[str, ...], pixel: np.ndarray) -> dict[str, Any]:
    """Poses, shifts (Angstrom), half sets and classes; ``pixel`` is used when no psize_A says otherwise."""
    prefix = _alignment_prefix(names)
    if prefix is None:
        return {}
    out: dict[str, Any] = {}
    pose = data[f"{prefix}/pose"].astype(np.float64)
    if prefix == "alignments3D":
        # A_RELION = expmap(r)^T (cryoDRGN parse_pose_csparc / R_from_relion).
        matrices = rotvec_to_matrix(torch.from_numpy(pose.reshape(-1, 3))).transpose(-1, -2)
        euler = matrix_to_euler(matrices).numpy()
        out.update(rot_deg=euler[:, 0], tilt_deg=euler[:, 1], psi_deg=euler[:, 2])
    else:
        out["psi_deg"] = np.degrees(pose.reshape(-1))
    if f"{prefix}/shift" in names:
        shift = data[f"{prefix}/shift"].astype(np.float64).reshape(-1, 2)
        # Shifts are in pixels of the alignment job, which may differ from the blob's.
        psize = data[f"{prefix}/psize_A"].astype(np.float64) if f"{prefix}/psize_A" in names else pixel
        out.update(shift_x_A=shift[:, 0] * psize, shift_y_A=shift[:, 1] * psize)
    if f"{prefix}/split" in names:
        out["random_subset"] = data[f"{prefix}/split"].astype(np.int64) + 1
    if f"{prefix}/class" in names:
        out["class_number"] = data[f"{prefix}/class"].astype(np.int64) + 1
    return out
