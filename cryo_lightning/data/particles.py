"""Particle stacks from a RELION STAR or cryoSPARC .cs file, streamed as sets of images.

The dataset holds only per-particle metadata (numpy arrays) and a picklable stack reader; image
bytes are read per batch, grouped by stack into contiguous runs, and converted to float32 and
preprocessed on the device. Memory is bounded by the batch, not the dataset.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cryo_lightning.data.preprocess import PreprocessConfig, Preprocessor, noise_spectrum
from cryo_lightning.io.errors import MAX_LISTED, InputError
from cryo_lightning.io.mrc import StackWriter
from cryo_lightning.io.particle_table import ParticleTable
from cryo_lightning.io.particles import read_particles
from cryo_lightning.io.stack_checks import check_box, check_pixel_size
from cryo_lightning.io.stack_paths import resolve_stacks
from cryo_lightning.io.stack_reader import StackReader
from cryo_lightning.physics.ctf import CTFParams
from cryo_lightning.physics.rotations import euler_to_matrix

__all__ = [
    "ParticleSource", "open_particles", "nonfinite_rows", "without_nonfinite", "metadata_batch", "preprocess_rows",
    "preprocessed_chunks", "estimate_noise_psd", "ParticleSetDataset",
    "ParticleDataModule",
]

_CTF_FIELDS = {  # CTFParams field -> canonical column
    "defocus_u": "defocus_u_A", "defocus_v": "defocus_v_A", "defocus_angle": "defocus_angle_deg",
    "voltage": "voltage_kV", "cs": "cs_mm", "amplitude_contrast": "amp_contrast",
    "phase_shift": "phase_shift_deg", "bfactor": "ctf_bfactor_A2", "scale": "ctf_scale",
}
_FLOAT_COLUMNS = ["pixel_size_A", *_CTF_FIELDS.values(), "rot_deg", "tilt_deg", "psi_deg", "shift_x_A", "shift_y_A"]


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
        params = CTFParams(**{f: torch.tensor(df[c].to_numpy(np.float32)) for f, c in _CTF_FIELDS.items()})
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


class ParticleSetDataset(Dataset):
    """Sets of ``set_size`` particles; item ``i`` is set ``i`` of a fixed, seeded grouping.

    Sets are formed once from a seeded permutation of ``rows`` (or in file order when
    ``shuffle`` is False, which makes every set one contiguous read); the sampler shuffles the
    order of sets. Batches are read by :meth:`__getitems__` in one grouped call.

    Args:
        source: the opened particles.
        rows: table rows that belong to this split.
        set_size: images per set ``N`` (1 for single-image models).
        shuffle: group a random permutation (training) rather than consecutive particles.
        seed: seed of the grouping.
    """

    def __init__(self, source: ParticleSource, rows: np.ndarray, set_size: int, shuffle: bool, seed: int) -> None:
        if set_size < 1:
            raise ValueError(f"set_size must be >= 1, got {set_size}")
        order = np.random.default_rng(seed).permutation(rows) if shuffle else np.asarray(rows)
        n_sets = len(order) // set_size
        if n_sets == 0:
            raise InputError(f"{source.table.source}: {len(order)} particles are fewer than one set of {set_size}")
        self.sets = order[: n_sets * set_size].reshape(n_sets, set_size)
        self.source = source
        df = source.table.particles
        # One (n, K) matrix, so a batch's metadata is a single gather.
        self.meta_columns = [*_FLOAT_COLUMNS, "data_sign"]
        self.meta = np.ascontiguousarray(df[self.meta_columns].to_numpy(np.float32))
        self.particle_id = df["particle_id"].to_numpy(np.int64)
        info = source.reader.infos[0]
        self.image_shape = (info.ny, info.nx)
        self.image_dtype = source.reader.dtype
        self._buffers: list[np.ndarray] = []

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_buffers"] = []  # per process
        return state

    def _buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An image buffer no live tensor refers to any more, or a new one.

        Reusing memory that has already been touched avoids the page faults of a fresh
        allocation, which cost about as much as the read itself for data in the page cache.
        A buffer is free once the only references left are the pool's and this loop's.
        """
        for buffer in self._buffers:
            if buffer.shape == shape and buffer.dtype == dtype and sys.getrefcount(buffer) <= 3:
                return buffer
        buffer = np.empty(shape, dtype)
        if len(self._buffers) < 4:
            self._buffers.append(buffer)
        return buffer

    def __len__(self) -> int:
        return len(self.sets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = self.sets[np.asarray(indices)]  # (B, N)
        flat = rows.reshape(-1)
        buffer = self._buffer((len(flat), *self.image_shape), self.image_dtype)
        images = self.source.reader.read(self.source.stack_ids[flat], self.source.stack_indices[flat], out=buffer)
        B, N = rows.shape
        batch = {"images": torch.from_numpy(images).reshape(B, N, *self.image_shape),
                 "particle_id": torch.from_numpy(self.particle_id[flat]).reshape(B, N)}
        meta = torch.from_numpy(self.meta[flat]).reshape(B, N, -1)
        for k, key in enumerate(self.meta_columns):
            batch[key] = meta[..., k]
        return batch


def _collate(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch  # __getitems__ already returns a whole batch


class ParticleDataModule(pl.LightningDataModule):
    """Particle images (and sets of images) from a RELION STAR or cryoSPARC .cs file.

    Batches (after :meth:`on_after_batch_transfer`, on the device) are dicts with ``noisy``
    ``(B, N, L, L)`` float32 preprocessed images, ``ctf`` ``(B, N, L, L)`` (the effective CTF of
    the processed images), ``ctf_mode``, ``pixel_size`` ``(B, N)``, ``particle_id`` ``(B, N)``,
    and ``rotations`` ``(B, N, 3, 3)`` / ``origins`` ``(B, N, 2)`` pixels when the file has
    poses. ``batch_size`` is per device; with DDP, Lightning's DistributedSampler shards the
    sets across ranks.

    Args:
        path: ``particles.star`` or ``particles.cs``.
        datadir: folder holding the stacks when the metadata's paths do not resolve on their own.
        pixel_size: override (Angstrom) for files that lack one.
        assume: values for missing CTF columns, e.g. ``{"amplitude_contrast": 0.1}``.
        set_size: images per set.
        batch_size: sets per batch, per device.
        val_fraction: fraction of particles held out for validation (seeded).
        preprocess: see :class:`~cryo_lightning.data.preprocess.PreprocessConfig`.
        cache_dir: if set, a one-off float16 copy of all particles is written there (e.g.
            node-local scratch, ``$TMPDIR`` is expanded) and read instead of the original stacks.
        num_workers: DataLoader workers reading stacks.
        seed: seed of the train/val split and of the set grouping.
        noise_psd_images: particles used to estimate the noise spectrum for whitening.
        return_ctf: add the per-image CTF ``(B, N, L, L)`` to batches (models that use the CTF
            need it; computing it costs more than reading the images on a CPU).
        strict: refuse a file with NaN/Inf images; by default they are left out of training and
            validation, with a warning naming their rows.
    """

    def __init__(
        self,
        path: str,
        datadir: str | None = None,
        pixel_size: float | None = None,
        assume: dict[str, float] | None = None,
        set_size: int = 16,
        batch_size: int = 4,
        val_fraction: float = 0.05,
        preprocess: PreprocessConfig | None = None,
        cache_dir: str | None = None,
        num_workers: int = 2,
        seed: int = 0,
        noise_psd_images: int = 1000,
        return_ctf: bool = True,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.path, self.datadir, self.pixel_size_override, self.assume = path, datadir, pixel_size, assume
        self.set_size, self.batch_size, self.val_fraction = set_size, batch_size, val_fraction
        self.preprocess = preprocess if preprocess is not None else PreprocessConfig()
        self.cache_dir, self.num_workers, self.seed = cache_dir, num_workers, seed
        self.noise_psd_images, self.return_ctf, self.strict = noise_psd_images, return_ctf, strict
        self.source: ParticleSource | None = None
        self.preprocessor: Preprocessor | None = None

    # -- opening, caching ---------------------------------------------------------------------

    def _open(self) -> ParticleSource:
        if self.source is None:
            source = open_particles(self.path, self.datadir, self.pixel_size_override, self.assume, self.strict)
            for message in source.warnings:
                print(f"cryol: warning: {message}")
            if self.cache_dir:
                source = self._cached(source)
            self.source = source
        return self.source

    def _cache_path(self, source: ParticleSource) -> Path:
        st = Path(self.path).stat()
        key = hashlib.sha1(f"{Path(self.path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{len(source)}".encode()).hexdigest()[:12]
        return Path(os.path.expandvars(self.cache_dir)) / f"cryol_cache_{key}.mrcs"

    def _cached(self, source: ParticleSource) -> ParticleSource:
        """Point the source at the float16 cache, writing it first if :meth:`prepare_data` did not."""
        path = self._ensure_cache(source)
        n = len(source)
        return ParticleSource(source.table, StackReader([path]), np.zeros(n, np.int64), np.arange(n, dtype=np.int64),
                              source.box, source.stored_ctf_mode, source.warnings)

    def _ensure_cache(self, source: ParticleSource) -> Path:
        path = self._cache_path(source)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            n, chunk = len(source), 1024
            pixel = float(source.table.particles["pixel_size_A"].median())
            with StackWriter(path, n, source.box, pixel, dtype=torch.float16, overwrite=True) as writer:
                for start in range(0, n, chunk):
                    rows = np.arange(start, min(start + chunk, n))
                    writer.write(torch.from_numpy(source.read(rows).astype(np.float32)))
        return path

    def prepare_data(self) -> None:
        # Runs once per node (local rank 0): the float16 cache goes to node-local disk.
        if self.cache_dir:
            self._ensure_cache(open_particles(self.path, self.datadir, self.pixel_size_override, self.assume,
                                              self.strict))

    # -- splits -------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        source = self._open()
        n = len(source)
        rng = np.random.default_rng(self.seed)
        n_val = int(round(self.val_fraction * n)) if stage != "predict" else 0
        if n_val and n - n_val < self.set_size:
            raise InputError(f"{self.path}: {n} particles are too few for a validation split and sets of {self.set_size}")
        perm = rng.permutation(n)
        self.val_rows, self.train_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        self.preprocessor = Preprocessor(self.preprocess, source.box)
        angles = source.table.particles[["rot_deg", "tilt_deg", "psi_deg"]].to_numpy()
        self._has_poses = bool(len(angles)) and not np.isnan(angles).any()
        if self.preprocess.whiten:
            self.preprocessor.noise_psd = estimate_noise_psd(source, self.preprocessor, self.noise_psd_images, self.seed)

    def _loader(self, rows: np.ndarray, shuffle: bool) -> DataLoader:
        dataset = ParticleSetDataset(self._open(), rows, self.set_size, shuffle=shuffle, seed=self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, collate_fn=_collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_rows, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_rows, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(np.arange(len(self._open())), shuffle=False)

    # -- on the device --------------------------------------------------------------------------

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not (isinstance(batch, dict) and "images" in batch):
            return batch
        source = self._open()
        params = None
        if source.table.has_ctf and (self.return_ctf or self.preprocess.phase_flip or self.preprocess.whiten):
            params = CTFParams(**{f: batch[c] for f, c in _CTF_FIELDS.items()})
        out = self.preprocessor(batch["images"], batch["pixel_size_A"], batch["data_sign"], params,
                                source.ctf_mode(self.preprocess))
        result = {"noisy": out["images"], "ctf_mode": out["ctf_mode"], "pixel_size": out["pixel_size"],
                  "particle_id": batch["particle_id"]}
        if self.return_ctf:
            result["ctf"] = out["ctf"]
        if self._has_poses:
            angles = torch.stack([batch["rot_deg"], batch["tilt_deg"], batch["psi_deg"]], dim=-1)
            result["rotations"] = euler_to_matrix(angles)
            result["origins"] = torch.stack([batch["shift_x_A"], batch["shift_y_A"]], -1) / out["pixel_size"][..., None]
        return result
