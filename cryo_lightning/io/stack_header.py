"""The header of one MRC particle stack (``.mrcs``, or ``.mrc`` stacks), read and checked against the file size.

Header fields are taken from ``mrcfile`` (opened with ``permissive=True`` so legacy headers
without the ``MAP`` ID work); the space group is ignored, since particle stacks with
``ispg = 1`` exist, and a 2D file is a stack of one image.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np

from cryo_lightning.io.errors import InputError

__all__ = ["READABLE_MODES", "HEADER_BYTES", "StackInfo", "read_stack_info"]

# MRC modes holding real images: int8, int16, float32, uint16, float16.
READABLE_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
HEADER_BYTES = 1024


@dataclass(frozen=True)
class StackInfo:
    """What the header of one MRC stack says, checked against the file size.

    Attributes:
        path: the stack file.
        n: number of images (sections ``nz``; a 2D file holds one image).
        ny: image rows (pixels).
        nx: image columns (pixels).
        dtype: numpy dtype of the stored values, including the file's byte order.
        data_offset: byte offset of the first image (1024 + extended header size).
        pixel_size: header pixel size along x (``cella.x / mx``) in Angstrom, or None when
            the header says 0 (unset). Writers often leave 1.0 when they do not know it.
    """

    path: Path
    n: int
    ny: int
    nx: int
    dtype: np.dtype
    data_offset: int
    pixel_size: float | None

    @property
    def frame_bytes(self) -> int:
        """Bytes per image."""
        return self.ny * self.nx * self.dtype.itemsize


def read_stack_info(path: str | os.PathLike) -> StackInfo:
    """Read and validate the header of an MRC stack.

    Args:
        path: ``.mrcs``/``.mrc`` file; modes 0 (int8), 1 (int16), 2 (float32), 6 (uint16)
            and 12 (float16) are accepted. The ``MAP`` ID and machine stamp may be missing.
    Returns:
        :class:`StackInfo`; ``n`` is ``nz`` whatever the space group says.
    Raises:
        InputError: the file is missing, is not an MRC file, uses another mode, has
            impossible dimensions, or is shorter than its header says ("truncated").
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
    except OSError as err:
        raise InputError(f"cannot open image stack {path}: {err.strerror or err}") from err
    with warnings.catch_warnings():
        # Legacy headers (no MAP ID, zero machine stamp) warn on every open; they are fine.
        warnings.simplefilter("ignore")
        try:
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                header = mrc.header.copy()
        except Exception as err:  # mrcfile raises ValueError, OSError, EOFError, ...
            raise InputError(f"{path}: not a readable MRC file ({err})") from err
    mode = int(header.mode)
    if mode not in READABLE_MODES:
        modes = ", ".join(f"{k} ({v})" for k, v in READABLE_MODES.items())
        raise InputError(
            f"{path}: MRC mode {mode} is not supported for particle images (supported: "
            f"{modes}); convert the stack to float32, e.g. with relion_image_handler"
        )
    nx, ny, nz, nsymbt = int(header.nx), int(header.ny), int(header.nz), int(header.nsymbt)
    if nx < 1 or ny < 1 or nz < 1 or nsymbt < 0:
        raise InputError(
            f"{path}: invalid MRC header (nx={nx}, ny={ny}, nz={nz}, extended header "
            f"{nsymbt} bytes); the file is corrupt or not an MRC stack"
        )
    dtype = mrcfile.utils.data_dtype_from_header(header)
    info = StackInfo(
        path=path,
        n=nz,
        ny=ny,
        nx=nx,
        dtype=dtype,
        data_offset=HEADER_BYTES + nsymbt,
        pixel_size=_header_pixel_size(header),
    )
    needed = info.data_offset + info.n * info.frame_bytes
    if file_size < needed:
        raise InputError(
            f"{path}: truncated stack: the header describes {nz} images of {ny}x{nx} "
            f"{dtype.name} ({needed} bytes with the header) but the file has only "
            f"{file_size} bytes; re-copy or re-extract it"
        )
    return info


def _header_pixel_size(header: np.recarray) -> float | None:
    mx, cella_x = int(header.mx), float(header.cella.x)
    if mx <= 0 or not math.isfinite(cella_x) or cella_x <= 0:
        return None
    return cella_x / mx
