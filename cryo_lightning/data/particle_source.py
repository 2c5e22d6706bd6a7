"""Particles from a RELION STAR, a cryoSPARC .cs or a plain stack, as a :class:`ParticleSource`:
the table, a picklable stack reader and the one read -> metadata -> preprocess step
(:func:`preprocess_rows`) that every tool and the data module go through.

Images are read per request, grouped by stack into contiguous runs, and converted to float32
and preprocessed on the device; NaN/Inf images are found once when a source is opened.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cryo_lightning.data.preprocess import PreprocessConfig, Preprocessor, noise_spectrum
from cryo_lightning.io.errors import MAX_LISTED, InputError
from cryo_lightning.io.particle_table import ParticleTable
from cryo_lightning.io.particles import read_particles
from cryo_lightning.io.stack_checks import check_box, check_pixel_size
from cryo_lightning.io.stack_paths import resolve_stacks
from cryo_lightning.io.stack_reader import StackReader
from cryo_lightning.physics.ctf import CTFParams

__all__ = [
    "ParticleSource", "open_particles", "nonfinite_rows", "without_nonfinite", "metadata_batch", "preprocess_rows",
    "preprocessed_chunks", "estimate_noise_psd", "CTF_FIELDS",
]

CTF_FIELDS = {  # CTFParams field -> canonical column
    "defocus_u": "defocus_u_A", "defocus_v": "defocus_v_A", "defocus_angle": "defocus_angle_deg",
    "voltage": "voltage_kV", "cs": "cs_mm", "amplitude_contrast": "amp_contrast",
    "phase_shift": "phase_shift_deg", "bfactor": "ctf_bfactor_A2", "scale": "ctf_scale",
}
FLOAT_COLUMNS = ["pixel_size_A", *CTF_FIELDS.values(), "rot_deg", "tilt_deg", "psi_deg", "shift_x_A", "shift_y_A"]


@dataclass
class ParticleSource:
    """A particle file opened for reading images: its table, a stack reader, and the checks' outcome.

    Attributes:
        table: the canonical metadata (:class:`~cryo_lightning.io.particle_table.ParticleTable`).
        reader: reads images by ``(stack_id, index)``.
        stack_ids: ``(n,)`` int64 stack of each particle (index into ``reader``).
        stack_indices: ``(n,)`` int64 0-based index of each particle in its stack.
        box: image size in pixels (common to all particles).
        stored_ctf_mode: ``"full"``, ``"premultiplied"`` or ``"none"`` (from the metadata).
        warnings: messages for the user (pixel-size disagreements, assumed values, ...).
    """

    table: ParticleTable
    reader: StackReader
    stack_ids: np.ndarray
    stack_indices: np.ndarray
    box: int
    stored_ctf_mode: str
    warnings: list[str]

    def __len__(self) -> int:
        return len(self.table)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Images of the given table rows, ``(len(rows), L, L)`` in the stored dtype."""
        return self.reader.read(self.stack_ids[rows], self.stack_indices[rows])

    def ctf_mode(self, config: PreprocessConfig) -> str:
        """The stored images' CTF mode: the config's override, else the metadata's."""
        return config.ctf_mode or self.stored_ctf_mode

    def subset(self, rows: np.ndarray) -> ParticleSource:
        """The source restricted to table positions ``rows`` (in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        return replace(self, table=self.table.subset(rows), stack_ids=self.stack_ids[rows],
                       stack_indices=self.stack_indices[rows], warnings=list(self.warnings))


def nonfinite_rows(source: ParticleSource, chunk_bytes: int = 64 << 20) -> np.ndarray:
    """Table positions (0-based, sorted) of the images holding any NaN or Inf pixel.

    Integer stacks cannot hold either and are not read. Floating-point ones are read once, in
    chunks of about ``chunk_bytes`` in stack order (contiguous reads), with a progress bar on a
    terminal. A corrupt image is a real event (a failed motion-correction or extraction job writes
    NaN), and one NaN spreads through every Fourier transform, normalisation, average and
    reconstruction it touches, so the check runs before any of them.
    """
    floating = [i for i, info in enumerate(source.reader.infos) if info.dtype.kind in "fc"]
    rows = np.flatnonzero(np.isin(source.stack_ids, floating))
    if not len(rows):
        return rows
    rows = rows[np.lexsort((source.stack_indices[rows], source.stack_ids[rows]))]
    per_image = source.reader.infos[floating[0]].frame_bytes
    chunk = max(1, chunk_bytes // max(per_image, 1))
    bad = [np.empty(0, np.int64)]
    for start in tqdm(range(0, len(rows), chunk), desc="checking images", unit="chunk", leave=False,
                      disable=True if len(rows) <= chunk else None):
        r = rows[start : start + chunk]
        finite = np.isfinite(source.read(r)).reshape(len(r), -1).all(axis=1)
        bad.append(r[~finite])
    return np.sort(np.concatenate(bad))


def without_nonfinite(source: ParticleSource, strict: bool = False, name: str | os.PathLike | None = None,
                      bad: np.ndarray | None = None) -> ParticleSource:
    """``source`` without its images holding NaN or Inf, with a warning naming how many and which rows.

    Args:
        source: the opened particles.
        strict: refuse the file instead (``--strict``).
        name: the file named in messages (default: the metadata file).
        bad: the positions to drop, if already known (default: :func:`nonfinite_rows`).

    Raises:
        InputError: with ``strict`` and any non-finite image, or when no image is finite.
    """
    bad = nonfinite_rows(source) if bad is None else np.asarray(bad, dtype=np.int64)
    if not len(bad):
        return source
    n = len(source)
    ids = source.table.particles["particle_id"].to_numpy()[bad] + 1
    listing = ", ".join(map(str, ids[:MAX_LISTED])) + (f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else "")
    what = f"{name or source.table.source}: {len(bad)} of {n} particle images hold NaN or Inf pixels (data rows {listing})"
    if strict:
        raise InputError(f"{what}; --strict refuses such a file: leave those rows out (e.g. cryol export --rows) "
                         "or drop --strict to have them left out with a warning")
    if len(bad) == n:
        raise InputError(f"{what}: no image is usable")
    keep = np.setdiff1d(np.arange(n), bad)
    kept = source.subset(keep)
    kept.warnings.append(f"{what}; they are left out of every statistic, reconstruction and output "
                         "(--strict refuses the file instead)")
    return kept


def open_particles(
    path: str | os.PathLike,
    datadir: str | os.PathLike | None = None,
    pixel_size: float | None = None,
    assume: dict[str, float] | None = None,
    strict: bool = False,
    check_finite: bool = True,
) -> ParticleSource:
    """Read a STAR/.cs file, resolve and check all its stacks, and return a :class:`ParticleSource`.

    Every problem that can be found before reading images (missing stacks, unreadable or truncated
    stacks, box mismatch, non-square images, unknown pixel size) raises one
    :class:`~cryo_lightning.io.errors.InputError` here. With ``check_finite`` the images are then
    read once and those holding NaN or Inf are left out with a warning, or refused with ``strict``
    (:func:`without_nonfinite`).
    """
    table = read_particles(path, pixel_size=pixel_size, assume=assume)
    if len(table) == 0:
        raise InputError(f"{path}: the file holds no particles")
    df = table.particles
    resolved = resolve_stacks(df["stack_name"].unique(), Path(path), Path(datadir) if datadir else None)
    names = list(resolved)
    reader = StackReader([resolved[n] for n in names])
    stack_ids = df["stack_name"].map({n: i for i, n in enumerate(names)}).to_numpy(np.int64)
    stack_indices = df["stack_index"].to_numpy(np.int64)
    # Index range per stack, before any work starts (one pass, however many stacks).
    largest = np.full(len(names), -1, dtype=np.int64)
    np.maximum.at(largest, stack_ids, stack_indices)
    beyond = np.flatnonzero(largest >= np.array([info.n for info in reader.infos]))
    if len(beyond):
        sid = int(beyond[0])
        raise InputError(f"{path}: particle index {largest[sid] + 1} (1-based) is beyond the end of "
                         f"{reader.infos[sid].path}, which holds {reader.infos[sid].n} images")
    boxes = df["box_px"].to_numpy()
    expected = int(boxes[boxes > 0][0]) if (boxes > 0).any() else None
    check_box(reader.infos, expected if expected is not None else -1, Path(path))
    box = reader.infos[0].nx
    warnings = list(table.warnings)
    pixel_warning = check_pixel_size(reader.infos, float(df["pixel_size_A"].median()), Path(path),
                                     given=pixel_size is not None)
    if pixel_warning:
        warnings.append(pixel_warning)
    optics = table.blocks.get("optics")
    flipped = isinstance(optics, pd.DataFrame) and "rlnCtfDataArePhaseFlipped" in optics \
        and bool((optics["rlnCtfDataArePhaseFlipped"] == 1).any())
    if not table.has_ctf:
        mode = "none"
    elif df["ctf_premultiplied"].any():
        mode = "premultiplied"
    elif flipped:
        mode = "phase_flipped"
    else:
        mode = "full"
    source = ParticleSource(table, reader, stack_ids, stack_indices, box, mode, warnings)
    return without_nonfinite(source, strict) if check_finite else source


def metadata_batch(source: ParticleSource, rows: np.ndarray) -> dict[str, Any]:
    """Per-particle pixel size ``(n,)``, data sign ``(n,)`` and CTF parameters of table rows."""
    df = source.table.particles.iloc[rows]
    params = None
    if source.table.has_ctf:
        params = CTFParams(**{f: torch.tensor(df[c].to_numpy(np.float32)) for f, c in CTF_FIELDS.items()})
    return {"pixel_size_A": torch.tensor(df["pixel_size_A"].to_numpy(np.float32)),
            "data_sign": torch.tensor(df["data_sign"].to_numpy(np.float32)), "ctf_params": params}


def preprocess_rows(
    source: ParticleSource, rows: np.ndarray, processor: Preprocessor, device: torch.device | str | None = None, *,
    images: torch.Tensor | None = None, data_sign: torch.Tensor | None = None, stored_mode: str | None = None,
    with_ctf: bool = True, whiten: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read table ``rows`` of ``source`` and preprocess them on ``device``: the one read -> metadata
    -> preprocess step that every tool and the noise estimate go through.

    Args:
        source, rows: the particles and which table rows (any order).
        processor: applies the preprocessing (its ``box`` is the stored box).
        device: where the images are processed (default CPU).
        images: the stored images of ``rows`` if the caller has read them already (not read again).
        data_sign: ``(n,)`` sign to apply instead of the table's (e.g. ones for images whose sign
            was corrected when they were written).
        stored_mode: the stored images' CTF mode instead of ``source.ctf_mode(processor.config)``.
        with_ctf: False when the caller needs no CTF (the returned ``ctf`` is then ones).
        whiten: see :meth:`~cryo_lightning.data.preprocess.Preprocessor.__call__`.
    Returns:
        ``(processed, metadata)``: the :class:`~cryo_lightning.data.preprocess.Preprocessor`'s dict
        and :func:`metadata_batch`'s (on the CPU).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    meta = metadata_batch(source, rows)
    stored = torch.from_numpy(source.read(rows)).to(dev) if images is None else images.to(dev)
    sign = meta["data_sign"] if data_sign is None else data_sign
    mode = source.ctf_mode(processor.config) if stored_mode is None else stored_mode
    out = processor(stored, meta["pixel_size_A"].to(dev), sign.to(dev), meta["ctf_params"] if with_ctf else None,
                    mode, whiten=whiten)
    return out, meta


def preprocessed_chunks(
    source: ParticleSource, rows: np.ndarray, processor: Preprocessor, device: torch.device | str | None = None,
    chunk: int = 1024, desc: str = "reading", **options: Any,
) -> Iterator[tuple[np.ndarray, dict[str, Any], dict[str, Any]]]:
    """:func:`preprocess_rows` over ``rows`` in chunks of ``chunk``, with a progress bar:
    yields ``(chunk_rows, processed, metadata)``."""
    for start in tqdm(range(0, len(rows), chunk), desc=desc, unit="chunk", disable=None):
        r = rows[start : start + chunk]
        yield (r, *preprocess_rows(source, r, processor, device, **options))


def estimate_noise_psd(source: ParticleSource, preprocessor: Preprocessor, n_images: int = 1000, seed: int = 0) -> torch.Tensor:
    """Noise spectrum ``(L_out, L_out)`` of up to ``n_images`` random particles, preprocessed
    but not whitened (see :func:`~cryo_lightning.data.preprocess.noise_spectrum`)."""
    rows = np.sort(np.random.default_rng(seed).permutation(len(source))[:n_images])
    out, _ = preprocess_rows(source, rows, preprocessor, whiten=False)
    return noise_spectrum(out["images"], preprocessor.config.background_radius)
