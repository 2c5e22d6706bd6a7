"""The canonical per-particle table that every metadata reader (RELION STAR, cryoSPARC .cs) returns.

One row per particle, in file order, with the same columns and units whatever the source format,
so that the image and training layers never look at RELION or cryoSPARC labels. The original
blocks are kept beside it so that a writer can carry every original column through.

Conventions (docs/conventions.md): Euler angles are RELION's ``(rot, tilt, psi)`` in degrees;
shifts are RELION origins in Angstrom (the particle centre sits at box centre minus the origin);
the CTF parameters are RELION's (defocus in Angstrom, positive underfocus, angle in degrees).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryo_lightning.io.errors import InputError

__all__ = [
    "COLUMNS",
    "DTYPES",
    "CTF_COLUMNS",
    "ParticleTable",
    "canonical_frame",
    "clean_stack_names",
]

# Column -> dtype of the canonical table ("str" is pandas' default string dtype).
DTYPES: dict[str, str] = {
    "particle_id": "int64",  # row index in the source file (0-based)
    "image_name": "str",  # rlnImageName as written, or f"{idx + 1:06d}@{path}" for .cs
    "stack_name": "str",  # stack path as written: "N@", a leading ">" and a trailing ":mrcs" removed
    "stack_index": "int64",  # 0-based image index in that stack
    "optics_group": "int64",
    "pixel_size_A": "float64",
    "box_px": "int64",  # -1 when the metadata does not say
    "voltage_kV": "float64",
    "cs_mm": "float64",
    "amp_contrast": "float64",
    "defocus_u_A": "float64",
    "defocus_v_A": "float64",
    "defocus_angle_deg": "float64",
    "phase_shift_deg": "float64",
    "ctf_bfactor_A2": "float64",
    "ctf_scale": "float64",
    "ctf_premultiplied": "bool",
    "data_sign": "int64",  # +1: protein white (RELION); cryoSPARC blob/sign
    "rot_deg": "float64",
    "tilt_deg": "float64",
    "psi_deg": "float64",
    "shift_x_A": "float64",
    "shift_y_A": "float64",
    "random_subset": "int64",  # 1 or 2 (RELION half sets); 0 when absent
    "class_number": "int64",  # 1-based; 0 when absent
    "micrograph_name": "str",  # "" when absent
}

COLUMNS: tuple[str, ...] = tuple(DTYPES)

# CTF columns; NaN exactly when the table has no CTF (``ParticleTable.has_ctf`` is False).
CTF_COLUMNS: tuple[str, ...] = (
    "voltage_kV",
    "cs_mm",
    "amp_contrast",
    "defocus_u_A",
    "defocus_v_A",
    "defocus_angle_deg",
    "phase_shift_deg",
    "ctf_bfactor_A2",
    "ctf_scale",
)

# Columns that must be finite in every row (CTF columns too when the table has a CTF).
_FINITE_COLUMNS: tuple[str, ...] = ("pixel_size_A", "shift_x_A", "shift_y_A")

# Labels of the CTF columns in the source formats, for messages: column -> (RELION, cryoSPARC).
_LABELS: dict[str, tuple[str, str]] = {
    "voltage_kV": ("rlnVoltage", "ctf/accel_kv"),
    "cs_mm": ("rlnSphericalAberration", "ctf/cs_mm"),
    "amp_contrast": ("rlnAmplitudeContrast", "ctf/amp_contrast"),
    "defocus_u_A": ("rlnDefocusU", "ctf/df1_A"),
    "defocus_v_A": ("rlnDefocusV", "ctf/df2_A"),
    "ctf_scale": ("rlnCtfScalefactor", "ctf/scale"),
}
# Physical ranges of CTF values: accelerating voltages of transmission microscopes, spherical
# aberration of objective lenses (Cs-corrected ~0 to ~10 mm), and the smallest mean underfocus that
# is not a unit mistake (micrometres for Angstrom) when no phase plate shifts the phase.
VOLTAGE_RANGE_KV = (20.0, 1000.0)
CS_RANGE_MM = (0.0, 20.0)
MIN_DEFOCUS_A = 100.0

# Defaults for columns a reader leaves out.
_DEFAULTS: dict[str, Any] = {
    "box_px": -1,
    "ctf_premultiplied": False,
    "data_sign": 1,
    "rot_deg": np.nan,
    "tilt_deg": np.nan,
    "psi_deg": np.nan,
    "shift_x_A": 0.0,
    "shift_y_A": 0.0,
    "random_subset": 0,
    "class_number": 0,
    "micrograph_name": "",
    **{c: np.nan for c in CTF_COLUMNS},
}


def canonical_frame(data: Mapping[str, Any], n: int) -> pd.DataFrame:
    """Build a canonical particle table from per-column values.

    Args:
        data: column name -> array-like of length ``n`` or a scalar (broadcast). Columns of
            :data:`COLUMNS` that are missing take their default (NaN angles and CTF, zero shifts,
            ``box_px = -1``, ``data_sign = +1``, ``random_subset = class_number = 0``,
            ``micrograph_name = ""``); ``particle_id`` defaults to ``0 .. n-1``.
        n: number of particles.

    Returns:
        DataFrame with exactly :data:`COLUMNS`, in order, with the dtypes of :data:`DTYPES`.
    """
    unknown = set(data) - set(COLUMNS)
    if unknown:
        raise ValueError(f"not canonical columns: {sorted(unknown)}")
    out = {}
    for name, dtype in DTYPES.items():
        if name in data:
            value = data[name]
        elif name == "particle_id":
            value = np.arange(n)
        elif name in _DEFAULTS:
            value = _DEFAULTS[name]
        else:
            raise ValueError(f"column {name} has no default and must be given")
        if np.ndim(value) == 0:
            value = [value] * n if dtype == "str" else np.full(n, value)
        series = pd.Series(value, copy=False)
        if len(series) != n:
            raise ValueError(f"column {name} has {len(series)} values, expected {n}")
        out[name] = series.astype(str if dtype == "str" else dtype).reset_index(drop=True)
    return pd.DataFrame(out)


def clean_stack_names(paths: pd.Series) -> pd.Series:
    """Stack paths as written, without cryoSPARC's leading ``>`` or RELION's trailing ``:mrcs``.

    ``>`` marks imported/symlinked data in cryoSPARC; ``:mrcs`` forces RELION to read a file as a
    stack. Neither is part of the file name. Vectorised (pandas ``.str``).
    """
    paths = paths.astype(str)
    return paths.str.removeprefix(">").str.removesuffix(":mrcs")


def _is_str_column(series: pd.Series) -> bool:
    return pd.api.types.is_string_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype)


@dataclass
class ParticleTable:
    """Per-particle metadata read from a STAR or .cs file, in the canonical form.

    Attributes:
        particles: the canonical table: columns :data:`COLUMNS` with dtypes :data:`DTYPES`, one
            row per particle in file order.
        source: the file it was read from.
        format: ``"relion-3.0"``, ``"relion-3.1"`` (also RELION 4 and 5) or ``"cryosparc"``.
        blocks: the original blocks as read: for STAR files ``starfile.read``'s dict (e.g.
            ``{"optics": ..., "particles": ...}``; key-value blocks are dicts); for .cs files
            ``{"particles": DataFrame}`` of the flattened fields. Row ``i`` of
            ``blocks[particle_block]`` is row ``i`` of ``particles``.
        particle_block: name of the block holding the particles.
        pixel_size_source: where the pixel size came from, in words.
        has_ctf: whether the file has CTF parameters (the CTF columns are NaN otherwise).
        warnings: what the reader assumed or filled in; one sentence each, naming the file.
    """

    particles: pd.DataFrame
    source: Path
    format: str
    blocks: dict[str, Any]
    particle_block: str
    pixel_size_source: str
    has_ctf: bool
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.particles)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ParticleTable:
        """The table restricted to ``indices`` (positions, in the order given; repeats allowed).

        Both the canonical table and the original particle block are subset, so they stay row
        aligned; ``particle_id`` keeps pointing at the row in the source file.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self.particles)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"subset indices out of range for {n} particles")
        blocks = dict(self.blocks)
        blocks[self.particle_block] = self.blocks[self.particle_block].iloc[idx].reset_index(drop=True)
        return replace(
            self,
            particles=self.particles.iloc[idx].reset_index(drop=True),
            blocks=blocks,
            warnings=list(self.warnings),
        )

    def validate(self) -> None:
        """Check columns, dtypes and values; raise :class:`InputError` naming the column and row.

        Every row needs a stack name, ``stack_index >= 0``, a finite positive pixel size and
        finite shifts; with ``has_ctf`` the CTF columns must be finite too.
        """
        df = self.particles
        if tuple(df.columns) != COLUMNS:
            raise InputError(f"{self.source}: particle table columns {list(df.columns)} are not {list(COLUMNS)}")
        for name, dtype in DTYPES.items():
            ok = _is_str_column(df[name]) if dtype == "str" else df[name].dtype == np.dtype(dtype)
            if not ok:
                raise InputError(f"{self.source}: column {name} has dtype {df[name].dtype}, expected {dtype}")
        for name in _FINITE_COLUMNS + (CTF_COLUMNS if self.has_ctf else ()):
            values = df[name].to_numpy()
            if name == "pixel_size_A":
                _raise_first_bad(self.source, df, name, ~(np.isfinite(values) & (values > 0)), "must be > 0")
            else:
                _raise_first_bad(self.source, df, name, ~np.isfinite(values), "must be a finite number")
        if self.has_ctf:
            self._check_ctf_ranges()
        _raise_first_bad(self.source, df, "stack_index", df["stack_index"].to_numpy() < 0, "must be >= 0")
        empty = (df["stack_name"].str.len() == 0).to_numpy()
        _raise_first_bad(self.source, df, "stack_name", empty, "must not be empty")


    def _check_ctf_ranges(self) -> None:
        """Refuse CTF values outside physical ranges, naming the file, the label, the optics group
        and data row, and the likely mistake (volts for kV, micrometres for Angstrom, a percentage
        for a fraction)."""
        df = self.particles
        star = self.source.suffix.lower() != ".cs"

        def refuse(column: str, bad: np.ndarray, rule: str, hint: str) -> None:
            if not bad.any():
                return
            i = int(np.flatnonzero(bad)[0])
            label = _LABELS[column][0 if star else 1]
            where = f"data row {int(df['particle_id'].iloc[i]) + 1}"
            if star:
                where = f"optics group {int(df['optics_group'].iloc[i])}, {where}"
            raise InputError(f"{self.source}: {label} is {df[column].iloc[i]:g} ({where}; {int(bad.sum())} bad "
                             f"row(s) in all): {rule}; {hint}")

        volts = df["voltage_kV"].to_numpy()
        refuse("voltage_kV", volts > VOLTAGE_RANGE_KV[1], f"the voltage is in kV, at most {VOLTAGE_RANGE_KV[1]:g}",
               "did you give volts? (300 kV, not 300000)")
        refuse("voltage_kV", volts < VOLTAGE_RANGE_KV[0], f"the voltage must be at least {VOLTAGE_RANGE_KV[0]:g} kV",
               "set the microscope's accelerating voltage (usually 200 or 300)")
        amp = df["amp_contrast"].to_numpy()
        refuse("amp_contrast", amp > 1, "the amplitude contrast is a fraction in [0, 1]",
               "did you give a percentage? (0.1, not 10)")
        refuse("amp_contrast", amp < 0, "the amplitude contrast is a fraction in [0, 1]",
               "use the positive fraction (usually 0.07-0.1)")
        cs = df["cs_mm"].to_numpy()
        refuse("cs_mm", (cs < CS_RANGE_MM[0]) | (cs > CS_RANGE_MM[1]),
               f"the spherical aberration is in mm, within [{CS_RANGE_MM[0]:g}, {CS_RANGE_MM[1]:g}]",
               "did you give micrometres? (2.7 mm, not 2700)")
        refuse("ctf_scale", df["ctf_scale"].to_numpy() <= 0, "the CTF scale factor must be > 0", "usually 1")
        plate = np.abs(df["phase_shift_deg"].to_numpy()) > 1.0  # near focus is normal with a phase plate
        for column in ("defocus_u_A", "defocus_v_A"):
            defocus = df[column].to_numpy()
            refuse(column, (defocus < 0) & ~plate, "defocus is positive for underfocus (RELION and cryoSPARC)",
                   "if your CTF program writes overfocus as positive, flip the sign")
            refuse(column, (defocus < MIN_DEFOCUS_A) & ~plate, f"the defocus is in Angstrom, at least "
                   f"{MIN_DEFOCUS_A:g} without a phase plate", "did you mean micrometres? (1.4 um = 14000 A)")


def _raise_first_bad(source: Path, df: pd.DataFrame, column: str, bad: np.ndarray, what: str) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        row = int(df["particle_id"].iloc[i]) + 1
        raise InputError(
            f"{source}: column {column} {what}, but data row {row} has {df[column].iloc[i]!r}"
            f" ({int(bad.sum())} bad row(s) in all)"
        )
