"""Reading and writing MRC maps (``.mrc``, ``.map``) and image stacks (``.mrcs``).

Arrays follow the project convention: volumes ``(z, y, x)``, stacks ``(n, y, x)``, float32.
Files are always opened with ``permissive=True`` because legacy writers (EMAN, old cryoDRGN)
omit the ``MAP`` ID string and machine stamp. Every write is atomic (temporary file beside the
target, then ``os.replace``) and refuses to replace an existing file unless
``overwrite=True``.
"""

from __future__ import annotations

import os
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import mrcfile
import numpy as np
import torch

from cryo_lightning.io.atomic_write import atomic_path
from cryo_lightning.io.errors import InputError

__all__ = [
    "MapData",
    "MrcReadError",
    "read_map",
    "require_cubic",
    "write_map",
    "write_stack",
    "read_stack",
    "StackWriter",
    "NonFiniteOutputError",
]

# MRC modes we can read, all converted to float32: int8, int16, float32, uint16, float16.
_READABLE_MODES = {0, 1, 2, 6, 12}
_WRITE_MODES = {torch.float32: 2, torch.float16: 12}


class MrcReadError(InputError):
    """An MRC file could not be read or has unsupported content (the message names the file)."""


@dataclass
class MapData:
    """A map read from an MRC file.

    Attributes:
        data: ``(z, y, x)`` float32 tensor (a 2D file gives ``(1, y, x)``), axes permuted
            according to the header's MAPC/MAPR/MAPS so that the last axis is X.
        pixel_size: the header's voxel size along X in Angstrom, or None when the header
            says 0 (unknown: take it from the STAR file or the command line). Check
            ``voxel_size`` (or use :func:`require_cubic`) for anisotropic voxels.
        voxel_size: ``(x, y, z)`` voxel sizes in Angstrom from the header (0 when unknown).
        origin: ``(x, y, z)`` header origin in Angstrom.
        path: the file read, for error messages.
    """

    data: torch.Tensor
    pixel_size: float | None
    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float]
    path: Path


def _axis_permutation(header, path: Path) -> tuple[int, int, int] | None:
    """Array-axis permutation taking mrcfile's (section, row, column) order to (Z, Y, X).

    Returns None for the standard order (1, 2, 3), or when the header has no valid order
    (legacy files with zeros), in which case the standard order is assumed.
    """
    order = (int(header.mapc), int(header.mapr), int(header.maps))
    if order == (1, 2, 3):
        return None
    if sorted(order) != [1, 2, 3]:
        warnings.warn(
            f"{path}: invalid axis order MAPC/MAPR/MAPS = {order}; assuming 1, 2, 3",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    # Array axes 0, 1, 2 hold sections, rows, columns, i.e. crystal axes maps, mapr, mapc.
    labels = [order[2], order[1], order[0]]
    return (labels.index(3), labels.index(2), labels.index(1))


def _load(path: str | os.PathLike) -> tuple[np.ndarray, object, Path]:
    """Read a file's data (copied, float32, 3D, (Z, Y, X)) and header."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MRC file not found: {path}")
    with warnings.catch_warnings(record=True) as caught:
        # Legacy headers trigger warnings on every open; keep them for the error message.
        warnings.simplefilter("always")
        try:
            with mrcfile.open(path, permissive=True, header_only=False) as m:
                header = m.header.copy()
                data = None if m.data is None else np.array(m.data)
        except Exception as err:  # mrcfile raises ValueError, OSError, EOFError, ...
            raise MrcReadError(f"cannot read MRC file {path}: {err}") from err
    if data is None:
        reasons = "; ".join(str(w.message) for w in caught) or "no data block"
        raise MrcReadError(f"cannot read MRC file {path}: {reasons}")
    mode = int(header.mode)
    if mode not in _READABLE_MODES:
        raise MrcReadError(
            f"{path}: unsupported MRC mode {mode} (readable modes: "
            f"{sorted(_READABLE_MODES)}; complex and packed modes are not supported)"
        )
    data = data.astype(np.float32, copy=False)
    if data.ndim == 2:
        data = data[None]
    perm = _axis_permutation(header, path)
    if perm is not None:
        data = data.transpose(perm)
    return np.ascontiguousarray(data), header, path


def read_map(path: str | os.PathLike) -> MapData:
    """Read an MRC/MAP volume (or a 2D image) into a :class:`MapData`.

    Args:
        path: MRC file; modes 0, 1, 2, 6 and 12 (float16) are converted to float32.
    Returns:
        :class:`MapData` with ``data`` ``(z, y, x)`` float32 (a 2D file gives ``(1, y, x)``).
    Raises:
        FileNotFoundError: the file does not exist.
        MrcReadError: the file is not a readable MRC file or uses an unsupported mode.
    """
    data, header, path = _load(path)
    vs = header.cella
    sampling = (int(header.mx), int(header.my), int(header.mz))
    voxel = tuple(
        float(c) / n if n > 0 else 0.0 for c, n in zip((vs.x, vs.y, vs.z), sampling)
    )
    origin = (float(header.origin.x), float(header.origin.y), float(header.origin.z))
    return MapData(
        data=torch.from_numpy(data),
        pixel_size=voxel[0] if voxel[0] > 0 else None,
        voxel_size=voxel,
        origin=origin,
        path=path,
    )


def require_cubic(m: MapData, rel_tol: float = 1e-3) -> MapData:
    """Check that a map is a cube with isotropic voxels, as the projector requires.

    Args:
        m: a map from :func:`read_map`.
        rel_tol: tolerated relative difference between the X, Y and Z voxel sizes.
    Returns:
        ``m`` unchanged.
    Raises:
        ValueError: the box is not ``L x L x L`` or the voxels are anisotropic; the message
            names the file and says how to fix it.
    """
    shape = tuple(m.data.shape)
    if len(set(shape)) != 1:
        raise InputError(
            f"{m.path}: map has shape {shape} (z, y, x) but a cubic box is needed; "
            "pad or crop it to a cube first (e.g. relion_image_handler --new_box)"
        )
    known = [v for v in m.voxel_size if v > 0]
    if known and (max(known) - min(known)) > rel_tol * max(known):
        raise InputError(
            f"{m.path}: anisotropic voxels {m.voxel_size} Angstrom (x, y, z); "
            "resample the map to isotropic voxels first"
        )
    return m


def read_stack(path: str | os.PathLike) -> torch.Tensor:
    """Read all images of an MRC stack (``.mrcs``, or ``.mrc`` holding a stack) into memory.

    The header's space group is ignored: a 3D file is taken as a stack of its sections.

    Args:
        path: MRC file, any readable mode.
    Returns:
        ``(n, L_y, L_x)`` float32 (a single 2D image gives ``n = 1``).
    """
    data, _, _ = _load(path)
    return torch.from_numpy(data)


class NonFiniteOutputError(InputError):
    """An output would hold NaN or Inf values: it is not written (its inputs, a checkpoint's
    weights or the float16 range are the usual causes). The CLI prints the message, exit 2."""


def _as_numpy(x: torch.Tensor, dtype: torch.dtype, path: str | os.PathLike,
              rows: np.ndarray | None = None) -> np.ndarray:
    """``x`` as a contiguous numpy array of ``dtype``, refusing non-finite values (outputs are
    checked before they are published): NaN or Inf already in ``x``, or values beyond float16's
    range that the conversion would turn into Inf. Messages name ``path`` and the first bad image
    (``rows``: the images' row numbers, else their positions in ``x``)."""
    if dtype not in _WRITE_MODES:
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    data = np.ascontiguousarray(x.detach().to("cpu", dtype).numpy())
    bad = ~np.isfinite(data)
    if bad.any():
        per_image = bad.reshape(bad.shape[0], -1).any(1) if data.ndim == 3 else bad.reshape(1, -1).any(1)
        i = int(np.flatnonzero(per_image)[0])
        row = int(rows[i]) if rows is not None else i
        where = f"image {row + 1} (1-based; {int(per_image.sum())} image(s) of this batch)" if data.ndim == 3 \
            else "the volume"
        source = x.detach().to("cpu", torch.float64)
        if dtype == torch.float16 and bool(torch.isfinite(source).all()):
            peak = float(source.abs().max())
            raise NonFiniteOutputError(
                f"{path}: values up to {peak:.3g} exceed float16's range (65504) in {where}: not written; write "
                "float32 (no --float16), or normalise the particles first")
        raise NonFiniteOutputError(
            f"{path}: {int(bad.sum())} NaN/Inf value(s) in {where}: not written (non-finite input images or "
            "model weights; check the inputs)")
    return data


def write_map(
    path: str | os.PathLike,
    volume: torch.Tensor,
    pixel_size: float,
    overwrite: bool = False,
) -> None:
    """Write a volume as an MRC map: float32 (mode 2), space group 1, origin 0.

    Args:
        path: output file (``.mrc``/``.map``).
        volume: ``(z, y, x)`` real tensor, any device.
        pixel_size: voxel size in Angstrom.
        overwrite: allow replacing an existing file.
    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be (z, y, x), got shape {tuple(volume.shape)}")
    data = _as_numpy(volume[None], torch.float32, path)[0]
    with atomic_path(path, overwrite) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(data)
            m.set_volume()
            m.voxel_size = pixel_size
            m.header.origin = (0.0, 0.0, 0.0)


def write_stack(
    path: str | os.PathLike,
    images: torch.Tensor,
    pixel_size: float,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> None:
    """Write images as an MRC stack (ispg 0, so readers see a stack, not a volume).

    Args:
        path: output file, normally ``.mrcs``.
        images: ``(n, L, L)`` real tensor, any device.
        pixel_size: pixel size in Angstrom.
        dtype: ``torch.float32`` (mode 2) or ``torch.float16`` (mode 12).
        overwrite: allow replacing an existing file.
    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    if images.ndim != 3:
        raise ValueError(f"images must be (n, L, L), got shape {tuple(images.shape)}")
    data = _as_numpy(images, dtype, path)
    with atomic_path(path, overwrite) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(data)
            m.set_image_stack()
            m.voxel_size = pixel_size


class StackWriter:
    """Stream a large stack into a preallocated MRC file, chunk by chunk, atomically.

    The file is memory-mapped (``mrcfile.new_mmap``) under a temporary name beside ``path``;
    on a clean exit it is renamed onto ``path``, on an exception (or if fewer than ``n``
    images were written) the temporary file is deleted and nothing appears at ``path``.

    Example::

        with StackWriter("particles.mrcs", n=10_000, L=128, pixel_size=1.5) as w:
            for batch in batches:
                w.write(batch)  # (b, 128, 128)

    Args:
        path: output file, normally ``.mrcs``.
        n: total number of images.
        L: image size in pixels.
        pixel_size: pixel size in Angstrom.
        dtype: ``torch.float32`` (mode 2) or ``torch.float16`` (mode 12).
        overwrite: allow replacing an existing file (checked on entry and before the rename).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        n: int,
        L: int,
        pixel_size: float,
        dtype: torch.dtype = torch.float32,
        overwrite: bool = False,
    ) -> None:
        if dtype not in _WRITE_MODES:
            raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
        if n < 1 or L < 1:
            raise ValueError(f"need n >= 1 and L >= 1, got n={n}, L={L}")
        self.path = Path(path)
        self.n, self.L, self.pixel_size = n, L, pixel_size
        self.dtype, self.overwrite = dtype, overwrite
        self.count = 0
        self._min, self._max, self._sum, self._sumsq = np.inf, -np.inf, 0.0, 0.0
        self._stack: ExitStack | None = None
        self._mrc = None

    def __enter__(self) -> StackWriter:
        stack = ExitStack()
        try:
            tmp = stack.enter_context(atomic_path(self.path, self.overwrite))
            mrc = stack.enter_context(
                mrcfile.new_mmap(
                    tmp, shape=(self.n, self.L, self.L), mrc_mode=_WRITE_MODES[self.dtype],
                    overwrite=True,
                )
            )
            mrc.set_image_stack()
            mrc.voxel_size = self.pixel_size
        except BaseException:
            stack.close()
            raise
        self._stack, self._mrc = stack, mrc
        return self

    def write(self, images: torch.Tensor) -> None:
        """Append ``(b, L, L)`` images (or one ``(L, L)`` image) after those already written."""
        if images.ndim == 2:
            images = images[None]
        self.write_rows(np.arange(self.count, self.count + images.shape[0]), images)

    def write_rows(self, rows: np.ndarray, images: torch.Tensor) -> None:
        """Write ``(b, L, L)`` images at the given 0-based rows (each row once, any order)."""
        if self._mrc is None:
            raise RuntimeError("StackWriter.write called outside its `with` block")
        rows = np.asarray(rows, dtype=np.int64)
        b = images.shape[0]
        if tuple(images.shape[1:]) != (self.L, self.L) or len(rows) != b:
            raise ValueError(f"expected {len(rows)} images of shape ({self.L}, {self.L}), got {tuple(images.shape)}")
        if self.count + b > self.n or (b and (rows.min() < 0 or rows.max() >= self.n)):
            raise ValueError(f"{self.path}: writing rows beyond a stack of {self.n} images")
        chunk = _as_numpy(images, self.dtype, self.path, rows=rows)
        self._mrc.data[rows] = chunk
        self.count += b
        c64 = chunk.astype(np.float64)
        if b:
            self._min = min(self._min, float(c64.min()))
            self._max = max(self._max, float(c64.max()))
        self._sum += float(c64.sum())
        self._sumsq += float((c64 * c64).sum())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        stack, mrc = self._stack, self._mrc
        self._stack, self._mrc = None, None
        if exc_type is None and self.count != self.n:
            # An incomplete stack is a failure: publish no truncated file.
            exc = ValueError(f"{self.path}: only {self.count} of {self.n} images were written")
            stack.__exit__(ValueError, exc, None)
            raise exc
        if exc_type is None:
            # Statistics accumulated chunk by chunk, so the whole stack is never loaded.
            n_values = self.n * self.L * self.L
            mean = self._sum / n_values
            mrc.header.dmin, mrc.header.dmax = self._min, self._max
            mrc.header.dmean = mean
            mrc.header.rms = max(self._sumsq / n_values - mean * mean, 0.0) ** 0.5
        # Closes the memory map, then renames the temporary file (or deletes it on error).
        return bool(stack.__exit__(exc_type, exc, tb))
