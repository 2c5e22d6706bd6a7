from __future__ import annotations

import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryo_lightning.io.atomic_write import atomic_path
from cryo_lightning.io.mrc import (
    MrcReadError,
    StackWriter,
    read_map,
    read_stack,
    require_cubic,
    write_map,
    write_stack,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _raw(path: Path) -> tuple[np.ndarray, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, permissive=True) as m:
            return np.array(m.data), m.header.copy()


def test_write_read_map_round_trip(tmp_path):
    vol = torch.randn(8, 10, 12, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "map.mrc"
    write_map(path, vol, pixel_size=1.7)
    m = read_map(path)
    assert m.data.dtype == torch.float32 and torch.equal(m.data, vol)
    assert m.pixel_size == pytest.approx(1.7)
    assert m.voxel_size == pytest.approx((1.7, 1.7, 1.7))
    assert m.origin == (0.0, 0.0, 0.0)
    raw, header = _raw(path)  # independent check of the header written
    assert int(header.ispg) == 1 and int(header.mode) == 2
    assert np.array_equal(raw, vol.numpy())
    assert float(header.dmax) == pytest.approx(vol.max().item())
    assert _leftovers(tmp_path) == ["map.mrc"]


def test_write_map_refuses_overwrite(tmp_path):
    path = tmp_path / "map.mrc"
    write_map(path, torch.zeros(4, 4, 4), 1.0)
    with pytest.raises(FileExistsError, match=r"map\.mrc.*overwrite=True"):
        write_map(path, torch.ones(4, 4, 4), 1.0)
    assert torch.equal(read_map(path).data, torch.zeros(4, 4, 4))
    write_map(path, torch.ones(4, 4, 4), 2.0, overwrite=True)
    assert torch.equal(read_map(path).data, torch.ones(4, 4, 4))
    assert _leftovers(tmp_path) == ["map.mrc"]


def test_atomic_path_cleans_up_on_error(tmp_path):
    final = tmp_path / "out.mrc"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(final, overwrite=False) as tmp:
            with mrcfile.new(tmp) as m:
                m.set_data(np.zeros((4, 4, 4), np.float32))
            assert tmp.exists() and tmp.parent == tmp_path
            raise RuntimeError("boom")
    assert _leftovers(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with atomic_path(tmp_path / "missing" / "x.mrc"):
            pass


def test_write_map_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken_set_volume(self):
        raise OSError("disk full")

    monkeypatch.setattr(mrcfile.mrcfile.MrcFile, "set_volume", broken_set_volume)
    with pytest.raises(OSError, match="disk full"):
        write_map(tmp_path / "map.mrc", torch.zeros(4, 4, 4), 1.0)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_read_stack(tmp_path, dtype):
    images = torch.randn(5, 6, 6, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "s.mrcs"
    write_stack(path, images, 2.5, dtype=dtype)
    out = read_stack(path)
    assert out.dtype == torch.float32 and out.shape == (5, 6, 6)
    assert torch.equal(out, images.to(dtype).float())
    _, header = _raw(path)
    assert int(header.ispg) == 0 and int(header.mode) == {torch.float32: 2, torch.float16: 12}[dtype]
    assert read_map(path).pixel_size == pytest.approx(2.5)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_stack(path, images, 2.5)


def test_stack_writer_round_trip(tmp_path):
    images = torch.randn(7, 8, 8, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "big.mrcs"
    with StackWriter(path, n=7, L=8, pixel_size=3.0) as w:
        assert not path.exists()  # nothing published before a successful exit
        w.write(images[:3])
        w.write(images[3])
        w.write(images[4:])
    assert torch.equal(read_stack(path), images)
    raw, header = _raw(path)
    assert int(header.ispg) == 0 and float(header.cella.x) == pytest.approx(3.0 * 8)
    assert float(header.dmin) == pytest.approx(images.min().item())
    assert float(header.dmean) == pytest.approx(images.mean().item(), abs=1e-6)
    assert float(header.rms) == pytest.approx(images.std(unbiased=False).item(), rel=1e-5)
    assert _leftovers(tmp_path) == ["big.mrcs"]
    with pytest.raises(FileExistsError, match="overwrite"):
        StackWriter(path, n=1, L=8, pixel_size=3.0).__enter__()


def test_stack_writer_removes_temp_file_on_error_or_incomplete(tmp_path):
    path = tmp_path / "big.mrcs"
    with pytest.raises(KeyError):
        with StackWriter(path, n=4, L=8, pixel_size=1.0) as w:
            w.write(torch.zeros(2, 8, 8))
            raise KeyError("interrupted")
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="only 2 of 4"):
        with StackWriter(path, n=4, L=8, pixel_size=1.0) as w:
            w.write(torch.zeros(2, 8, 8))
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="stack of 4"):
        with StackWriter(path, n=4, L=8, pixel_size=1.0) as w:
            w.write(torch.zeros(5, 8, 8))
    assert _leftovers(tmp_path) == []


def test_unreadable_files_name_the_file(tmp_path):
    bad = tmp_path / "garbage.mrc"
    bad.write_bytes(b"not an mrc file at all" * 3)
    with pytest.raises(MrcReadError, match="garbage.mrc"):
        read_map(bad)
    # Long enough for a header: permissive mrcfile opens it but finds no data block.
    bad.write_bytes(b"hello world\n" * 500)
    with pytest.raises(MrcReadError, match="garbage.mrc.*Map ID string not found"):
        read_stack(bad)
    truncated = tmp_path / "truncated.mrc"
    write_map(truncated, torch.zeros(8, 8, 8), 1.0)
    truncated.write_bytes(truncated.read_bytes()[:1500])
    with pytest.raises(MrcReadError, match="truncated.mrc"):
        read_map(truncated)
    with pytest.raises(FileNotFoundError, match="nope.mrc"):
        read_map(tmp_path / "nope.mrc")


def test_require_cubic(tmp_path):
    path = tmp_path / "box.mrc"
    write_map(path, torch.zeros(4, 4, 6), 1.0)
    with pytest.raises(ValueError, match=r"box\.mrc.*\(4, 4, 6\)"):
        require_cubic(read_map(path))
    cube = tmp_path / "cube.mrc"
    write_map(cube, torch.zeros(5, 5, 5), 1.0)
    assert require_cubic(read_map(cube)).data.shape == (5, 5, 5)


# --- fixtures from public repositories (../shared/data/real) ---


def test_emd_3001_axis_order(shared_data):
    path = shared_data / "real" / "mrcfile" / "EMD-3001.map"
    raw, header = _raw(path)
    assert (int(header.mapc), int(header.mapr), int(header.maps)) == (3, 1, 2)
    m = read_map(path)
    # raw[s, r, c]: columns run along Z, rows along X, sections along Y, so the value at
    # (Z=c, Y=s, X=r) is raw[s, r, c].
    expected = np.transpose(raw, (2, 0, 1))
    assert m.data.shape == (73, 25, 43)
    assert np.array_equal(m.data.numpy(), expected)
    assert m.data[10, 3, 7].item() == raw[3, 7, 10]
    assert m.voxel_size == pytest.approx((17.93 / 40, 4.71 / 12, 33.03 / 72))
    with pytest.raises(ValueError, match="EMD-3001.map"):
        require_cubic(m)


def test_float16_image(shared_data):
    path = shared_data / "real" / "mrcfile" / "float16.mrc"
    raw, header = _raw(path)
    assert raw.dtype == np.float16
    m = read_map(path)
    assert m.data.dtype == torch.float32 and m.data.shape == (1, 64, 64)
    assert np.array_equal(m.data[0].numpy(), raw.astype(np.float32))
    assert m.pixel_size == pytest.approx(3.5953, abs=1e-4)


def test_aspire_ribosome_no_pixel_size(shared_data):
    m = read_map(shared_data / "real" / "ASPIRE-Python" / "clean70SRibosome_vol_65p.mrc")
    assert m.data.shape == (65, 65, 65) and m.pixel_size is None
    require_cubic(m)


def test_relion_ref_model(shared_data):
    path = shared_data / "real" / "relion" / "ref_model.mrc"
    m = read_map(path)
    assert m.data.shape == (100, 100, 100)
    assert m.pixel_size == pytest.approx(3.54)
    assert m.origin == pytest.approx((-3.54, -3.54, -3.54))
    raw, _ = _raw(path)
    assert np.array_equal(m.data.numpy(), raw)


def test_legacy_header_stack(shared_data):
    path = shared_data / "real" / "cryodrgn" / "hand.5.mrcs"
    with pytest.raises(ValueError):
        mrcfile.open(path).close()  # strict open fails: no MAP ID
    stack = read_stack(path)
    raw, _ = _raw(path)
    assert stack.shape == (5, 64, 64) and stack.dtype == torch.float32
    assert np.array_equal(stack.numpy(), raw)


def test_emd_3197_nonzero_start_and_cryojax_potential(shared_data):
    """Two more real maps: EMDB's 20^3 map with nxstart = -2, and a 64^3 potential at 4.4 A."""
    emd = read_map(shared_data / "real" / "mrcfile" / "EMD-3197.map")
    assert tuple(emd.data.shape) == (20, 20, 20) and emd.pixel_size == pytest.approx(11.4)
    with mrcfile.open(shared_data / "real" / "mrcfile" / "EMD-3197.map", permissive=True) as f:
        assert int(f.header.nxstart) == -2  # the map's data are read as stored, not shifted
        np.testing.assert_array_equal(emd.data.numpy(), f.data)
    potential = require_cubic(read_map(shared_data / "real" / "cryojax" / "3j9g_potential_ps4_4.mrc"))
    assert tuple(potential.data.shape) == (64, 64, 64) and potential.pixel_size == pytest.approx(4.4)
    assert float(potential.data.min()) >= -1e-6  # a scattering potential is non-negative


def test_non_finite_outputs_are_refused_and_nothing_is_written(tmp_path):
    """Outputs are checked before they are published (issue 22): NaN or Inf in a map or stack, or
    values that float16 cannot hold, raise NonFiniteOutputError naming the file and the first bad
    image, and leave no file (nor temporary file) behind."""
    from cryo_lightning.io.mrc import NonFiniteOutputError

    images = torch.zeros(5, 8, 8)
    images[3, 2, 2] = float("nan")
    with pytest.raises(NonFiniteOutputError, match=r"s.mrcs: 1 NaN/Inf value\(s\) in image 4 \(1-based"):
        write_stack(tmp_path / "s.mrcs", images, 1.0)
    volume = torch.zeros(4, 4, 4)
    volume[0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteOutputError, match=r"m.mrc: 1 NaN/Inf value\(s\) in the volume: not written"):
        write_map(tmp_path / "m.mrc", volume, 1.0)
    with pytest.raises(NonFiniteOutputError, match=r"h.mrcs: values up to 1e\+06 exceed float16's range"):
        write_stack(tmp_path / "h.mrcs", torch.full((2, 8, 8), 1e6), 1.0, dtype=torch.float16)
    with pytest.raises(NonFiniteOutputError, match=r"w.mrcs: .* in image 7 \(1-based"):
        with StackWriter(tmp_path / "w.mrcs", 8, 8, 1.0) as writer:
            writer.write_rows(np.array([0, 6]), torch.stack([torch.zeros(8, 8), torch.full((8, 8), float("nan"))]))
    assert list(tmp_path.iterdir()) == []
