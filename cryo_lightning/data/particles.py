"""Particle stacks from a RELION STAR or cryoSPARC .cs file, streamed as sets of images for
``cryol fit`` (:class:`ParticleDataModule`).

The dataset holds only per-particle metadata (numpy arrays) and a picklable stack reader; image
bytes are read per batch, grouped by stack into contiguous runs, and converted to float32 and
preprocessed on the device. Memory is bounded by the batch, not the dataset.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cryo_lightning.data.particle_source import (CTF_FIELDS, FLOAT_COLUMNS, ParticleSource, estimate_noise_psd,
                                                 open_particles)
from cryo_lightning.data.preprocess import PreprocessConfig, Preprocessor
from cryo_lightning.io.errors import InputError
from cryo_lightning.io.mrc import StackWriter
from cryo_lightning.io.stack_reader import StackReader
from cryo_lightning.physics.ctf import CTFParams
from cryo_lightning.physics.rotations import euler_to_matrix

__all__ = ["ParticleSetDataset", "ParticleDataModule"]


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
        self.meta_columns = [*FLOAT_COLUMNS, "data_sign"]
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
            params = CTFParams(**{f: batch[c] for f, c in CTF_FIELDS.items()})
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
