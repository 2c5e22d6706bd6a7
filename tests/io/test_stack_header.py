"""MRC stack headers: fixture details, truncated stacks, unsupported modes and non-MRC files."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cryo_lightning.io.errors import InputError
from cryo_lightning.io.stack_header import read_stack_info
from tests.io.conftest import write_mrc_stack


def test_header_details_of_fixtures(shared_data):
    real = shared_data / "real"
    trpv1 = read_stack_info(real / "cryojax/trpv1_small_stack.mrcs")
    assert trpv1.pixel_size == pytest.approx(4.88) and trpv1.data_offset == 1024
    assert read_stack_info(real / "cryodrgn/empiar_10076_7.mrc").pixel_size is None
    assert read_stack_info(real / "mrcfile/float16.mrc").pixel_size == pytest.approx(3.5953124)


def test_truncated_stack_names_both_sizes(tmp_path):
    path = write_mrc_stack(tmp_path / "cut.mrcs", np.ones((5, 16, 16), np.float32))
    full = path.stat().st_size
    os.truncate(path, full - 100)
    with pytest.raises(InputError, match="truncated") as err:
        read_stack_info(path)
    assert str(full) in str(err.value) and str(full - 100) in str(err.value)
    assert str(path) in str(err.value)


def test_unsupported_mode_and_non_mrc_files(tmp_path):
    path = write_mrc_stack(tmp_path / "complex.mrcs", np.ones((2, 8, 8), np.complex64))
    with pytest.raises(InputError, match="mode 4") as err:
        read_stack_info(path)
    assert str(path) in str(err.value)
    text = tmp_path / "notes.mrcs"
    text.write_text("not an image stack\n")
    with pytest.raises(InputError, match="notes.mrcs"):
        read_stack_info(text)
