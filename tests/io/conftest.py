"""Shared pieces of the io tests."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np


def write_mrc_stack(path: Path, data: np.ndarray, voxel_size: float | None = None) -> Path:
    """An MRC image stack (``ispg`` 0) holding ``data``, with ``voxel_size`` Angstrom when given."""
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.set_image_stack()
        if voxel_size is not None:
            m.voxel_size = voxel_size
    return path
