"""Stack headers against the metadata: box size and pixel size checks."""

from __future__ import annotations


import numpy as np
import pytest

from cryo_lightning.io.errors import InputError
from cryo_lightning.io.stack_checks import check_box, check_pixel_size
from cryo_lightning.io.stack_header import read_stack_info
from tests.io.conftest import write_mrc_stack


def test_box_check_on_relion5_numbers(shared_data):
    folder = shared_data / "real/cryodrgn"
    star = folder / "relion5.star"
    names = ("toy_images_a.mrcs", "toy_images_b.mrcs")
    infos = [read_stack_info(folder / "toy_datadir" / n) for n in names]
    with pytest.raises(InputError) as err:
        check_box(infos, 448, star)  # the STAR's rlnImageSize
    msg = str(err.value)
    assert str(star) in msg and "toy_images_a.mrcs" in msg and "448" in msg and "30x30" in msg
    assert "rlnImageSize" in msg and "--datadir" in msg
    check_box(infos, 30, star)
    check_box(infos, -1, star)  # unknown: not checked
    check_box(infos, {infos[0].path: 30, infos[1].path: -1}, star)
    with pytest.raises(InputError, match="toy_images_b"):
        check_box(infos, {str(infos[1].path): 448}, star)


def test_non_square_images_are_refused(tmp_path):
    info = read_stack_info(write_mrc_stack(tmp_path / "rect.mrcs", np.zeros((2, 16, 20), np.float32)))
    with pytest.raises(InputError, match="non-square") as err:
        check_box([info], -1, tmp_path / "p.star")
    assert "16x20" in str(err.value)


def test_pixel_size_check(shared_data, tmp_path):
    real = shared_data / "real"
    trpv1 = [read_stack_info(real / "cryojax/trpv1_small_stack.mrcs")]
    star = real / "cryojax/trpv1_small_stack.star"
    assert check_pixel_size(trpv1, 4.88, star) is None
    assert check_pixel_size(trpv1, 4.90, star) is None  # within 1 %
    warning = check_pixel_size(trpv1, 2.44, star)
    assert warning is not None and "4.88" in warning and "2.44" in warning and str(star) in warning
    # relion5: header 1.0 (unset) vs 0.89 in the STAR: not comparable, no warning.
    toy = [read_stack_info(real / "cryodrgn/toy_datadir/toy_images_a.mrcs")]
    assert toy[0].pixel_size == pytest.approx(1.0)
    assert check_pixel_size(toy, 0.89, real / "cryodrgn/relion5.star") is None
    # sta_testing_bin8: the STAR's 1.96 A is 8x too small, but the header says 1.0 (unset),
    # so the mismatch cannot be detected from the stack (documented in check_pixel_size).
    sta = [read_stack_info(real / "cryodrgn/ay19102021_L3_position6_ribo_it09_bin8_1.82A.mrcs")]
    assert sta[0].pixel_size == pytest.approx(1.0)
    assert check_pixel_size(sta, 1.96, real / "cryodrgn/sta_testing_bin8.star") is None
    # A binned stack whose header knows its pixel size is caught.
    bin8 = write_mrc_stack(tmp_path / "bin8.mrcs", np.zeros((2, 8, 8), np.float32), voxel_size=15.68)
    binned = [read_stack_info(bin8)]
    warning = check_pixel_size(binned, {binned[0].path: 1.96}, "sta.star")
    assert warning is not None and "15.68" in warning and "1.96" in warning
