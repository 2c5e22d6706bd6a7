from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryo_lightning.io.errors import InputError
from cryo_lightning.io.stack_header import read_stack_info
from cryo_lightning.io.stack_reader import StackReader
from tests.io.conftest import write_mrc_stack

# Every particle-stack fixture: (path under real/, (n, ny, nx), numpy dtype).
FIXTURE_STACKS = [
    ("cryodrgn/empiar_10076_7.mrc", (7, 320, 320), np.float32),  # ispg = 1
    ("cryodrgn/relion31.mrcs", (5, 256, 256), np.float32),  # no MAP ID
    ("cryodrgn/hand.5.mrcs", (5, 64, 64), np.float32),  # EMAN legacy header
    ("cryodrgn/ay19102021_L3_position6_ribo_it09_bin8_1.82A.mrcs", (220, 64, 64), np.float32),
    ("cryodrgn/toy_datadir/toy_images_a.mrcs", (100, 30, 30), np.float32),
    ("cryodrgn/toy_datadir/toy_images_b.mrcs", (900, 30, 30), np.float32),
    ("ASPIRE-Python/sample.mrcs", (17, 200, 200), np.float32),  # ispg = 1
    ("ASPIRE-Python/rln_proj_64.mrcs", (5, 64, 64), np.float32),
    ("ASPIRE-Python/rln_proj_64_centered.mrcs", (4, 64, 64), np.float32),
    ("ASPIRE-Python/rln_proj_64_shifted.mrcs", (4, 64, 64), np.float32),
    ("ASPIRE-Python/rln_proj_65.mrcs", (5, 65, 65), np.float32),
    ("ASPIRE-Python/rln_proj_65_centered.mrcs", (4, 65, 65), np.float32),
    ("ASPIRE-Python/rln_proj_65_shifted.mrcs", (4, 65, 65), np.float32),
    ("cryojax/000000.mrcs", (3, 16, 16), np.float32),
    ("cryojax/trpv1_small_stack.mrcs", (10, 48, 48), np.float32),
    ("mrcfile/float16.mrc", (1, 64, 64), np.float16),  # mode 12, a single 2D image
]


def _reference(path: Path) -> np.ndarray:
    """All images as mrcfile reads them, (n, ny, nx)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, permissive=True) as m:
            data = np.array(m.data)
    return data.reshape((-1,) + data.shape[-2:])


def _random_requests(rng, sizes, n):
    """Random (stack, index) pairs over stacks of the given sizes, with repeats."""
    stack_ids = rng.integers(0, len(sizes), n)
    indices = np.array([rng.integers(0, sizes[s]) for s in stack_ids])
    return stack_ids, indices


@pytest.mark.parametrize("name, shape, dtype", FIXTURE_STACKS, ids=[f[0] for f in FIXTURE_STACKS])
def test_fixture_stacks_match_mrcfile(shared_data, name, shape, dtype):
    path = shared_data / "real" / name
    info = read_stack_info(path)
    assert (info.n, info.ny, info.nx) == shape and info.dtype == np.dtype(dtype)
    ref = _reference(path)
    assert ref.shape == shape
    reader = StackReader([path])
    rng = np.random.default_rng(0)
    n = shape[0]
    requests = [
        np.arange(n),  # everything, one contiguous run
        rng.integers(0, n, 40),  # random, unsorted, with repeats
        np.arange(n)[::-1],  # reversed run
    ]
    for idx in requests:
        got = reader.read(np.zeros(len(idx), np.int64), idx)
        assert got.dtype == np.dtype(dtype) and got.shape == (len(idx),) + shape[1:]
        np.testing.assert_array_equal(got, ref[idx])


def test_requests_spanning_stacks_and_mixed_dtypes(shared_data):
    real = shared_data / "real"
    paths = [
        real / "cryodrgn/toy_datadir/toy_images_a.mrcs",
        real / "cryodrgn/toy_datadir/toy_images_b.mrcs",
    ]
    refs = [_reference(p) for p in paths]
    reader = StackReader(paths)
    rng = np.random.default_rng(1)
    sid, idx = _random_requests(rng, [100, 900], 300)
    sid[:20], idx[:20] = 1, np.arange(500, 520)  # a contiguous run among random ones
    got = reader.read(sid, idx)
    np.testing.assert_array_equal(got, np.stack([refs[s][i] for s, i in zip(sid, idx)]))

    # float16 and float32 stacks of one size: float32 out, float16 values exact in it.
    mixed = [real / "mrcfile/float16.mrc", real / "ASPIRE-Python/rln_proj_64_centered.mrcs"]
    reader = StackReader(mixed)
    got = reader.read(np.array([1, 0, 1, 0]), np.array([3, 0, 0, 0]))
    assert got.dtype == np.float32
    f16, f32 = _reference(mixed[0]), _reference(mixed[1])
    np.testing.assert_array_equal(got, np.stack([f32[3], f16[0], f32[0], f16[0]]))


@pytest.mark.parametrize("dtype, mode", [(np.int8, 0), (np.int16, 1), (np.uint16, 6),
                                         (np.float16, 12), (">f4", 2)])
def test_integer_half_and_big_endian_stacks(tmp_path, dtype, mode):
    rng = np.random.default_rng(2)
    data = rng.integers(-100 if np.dtype(dtype).kind != "u" else 0, 100, (9, 12, 12))
    data = data.astype(dtype)
    path = write_mrc_stack(tmp_path / "s.mrcs", data)
    info = read_stack_info(path)
    assert info.dtype == np.dtype(dtype) and info.n == 9
    with mrcfile.open(path, header_only=True) as m:
        assert int(m.header.mode) == mode
    idx = np.array([8, 0, 1, 2, 2, 5])
    got = StackReader([path]).read(np.zeros(6, np.int64), idx)
    assert got.dtype == np.dtype(dtype).newbyteorder("=") and got.dtype.isnative
    np.testing.assert_array_equal(got, data[idx])


def test_all_header_problems_are_reported_together(tmp_path):
    good = write_mrc_stack(tmp_path / "good.mrcs", np.zeros((2, 8, 8), np.float32))
    cut = write_mrc_stack(tmp_path / "cut.mrcs", np.zeros((4, 8, 8), np.float32))
    os.truncate(cut, 1024 + 8 * 8 * 4)
    cplx = write_mrc_stack(tmp_path / "complex.mrcs", np.ones((2, 8, 8), np.complex64))
    with pytest.raises(InputError) as err:
        StackReader([good, cut, tmp_path / "missing.mrcs", cplx])
    msg = str(err.value)
    assert msg.startswith("3 of 4 image stacks cannot be read")
    assert "truncated" in msg and "missing.mrcs" in msg and "mode 4" in msg
    assert "good.mrcs" not in msg


def test_index_out_of_range_names_stack_index_and_size(tmp_path):
    a = write_mrc_stack(tmp_path / "a.mrcs", np.zeros((3, 8, 8), np.float32))
    b = write_mrc_stack(tmp_path / "b.mrcs", np.zeros((5, 8, 8), np.float32))
    reader = StackReader([a, b])
    with pytest.raises(InputError) as err:
        reader.read(np.array([0, 1, 1]), np.array([0, 4, 5]))
    msg = str(err.value)
    assert str(b) in msg and "index 5" in msg and "holds 5 images" in msg
    with pytest.raises(InputError, match="index -1"):
        reader.read(np.array([0]), np.array([-1]))


def test_stacks_of_different_sizes_cannot_share_a_batch(tmp_path):
    a = write_mrc_stack(tmp_path / "a.mrcs", np.zeros((3, 8, 8), np.float32))
    b = write_mrc_stack(tmp_path / "b.mrcs", np.zeros((3, 10, 10), np.float32))
    reader = StackReader([a, b])
    assert reader.read(np.array([1, 1]), np.array([0, 2])).shape == (2, 10, 10)
    with pytest.raises(InputError, match="different sizes"):
        reader.read(np.array([0, 1]), np.array([0, 0]))


def test_out_buffer_and_empty_requests(tmp_path):
    data = np.random.default_rng(3).standard_normal((6, 8, 8)).astype(np.float32)
    reader = StackReader([write_mrc_stack(tmp_path / "a.mrcs", data)])
    buf = np.full((3, 8, 8), np.nan, np.float32)
    assert reader.read(np.zeros(3, np.int64), np.array([5, 1, 2]), out=buf) is buf
    np.testing.assert_array_equal(buf, data[[5, 1, 2]])
    with pytest.raises(ValueError, match="out must be"):
        reader.read(np.zeros(2, np.int64), np.array([0, 1]), out=buf)
    assert reader.read(np.array([], np.int64), np.array([], np.int64)).shape == (0, 8, 8)


def test_pickles_small_and_reads_the_same_after(tmp_path):
    rng = np.random.default_rng(4)
    stacks = [rng.standard_normal((20, 32, 32)).astype(np.float32) for _ in range(3)]
    paths = [write_mrc_stack(tmp_path / f"s{k}.mrcs", s) for k, s in enumerate(stacks)]
    reader = StackReader(paths)
    sid, idx = _random_requests(rng, [20, 20, 20], 50)
    before = reader.read(sid, idx)  # leaves files open in the cache
    blob = pickle.dumps(reader)
    assert len(blob) < 2000, len(blob)  # stack list only: no data, maps or handles
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone.read(sid, idx), before)
    assert [i.dtype for i in clone.infos] == [i.dtype for i in reader.infos]


def test_open_files_are_bounded_by_the_lru(tmp_path):
    data = [np.full((4, 8, 8), k, np.float32) for k in range(6)]
    paths = [write_mrc_stack(tmp_path / f"s{k}.mrcs", d) for k, d in enumerate(data)]
    reader = StackReader(paths, max_open_files=2)

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    has_proc = os.path.isdir("/proc/self/fd")
    start = open_fds() if has_proc else 0
    for _ in range(3):
        for k in range(6):
            got = reader.read(np.array([k, k]), np.array([3, 0]))
            assert np.all(got == k)
            if has_proc:
                assert open_fds() - start <= 2
    reader.close()
    if has_proc:
        assert open_fds() == start


def test_threads_read_concurrently(tmp_path):
    rng = np.random.default_rng(5)
    stacks = [rng.standard_normal((30, 16, 16)).astype(np.float32) for _ in range(4)]
    paths = [write_mrc_stack(tmp_path / f"s{k}.mrcs", s) for k, s in enumerate(stacks)]
    reader = StackReader(paths, max_open_files=1)  # evictions in every thread
    jobs = [_random_requests(np.random.default_rng(k), [30] * 4, 64) for k in range(16)]

    def run(job):
        sid, idx = job
        expected = np.stack([stacks[s][i] for s, i in zip(sid, idx)])
        return np.array_equal(reader.read(sid, idx), expected)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, jobs))


_FORK_READER: StackReader | None = None


def _read_in_child(queue) -> None:
    queue.put(_FORK_READER.read(np.array([0, 0]), np.array([2, 1])))


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_forked_process_reopens_its_files(tmp_path):
    global _FORK_READER
    data = np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8)
    _FORK_READER = StackReader([write_mrc_stack(tmp_path / "a.mrcs", data)])
    _FORK_READER.read(np.array([0]), np.array([0]))  # the parent has the file open
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(queue,))
    child.start()
    got = queue.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0
    np.testing.assert_array_equal(got, data[[2, 1]])
    # The parent's handle still works after the child closed its copy.
    np.testing.assert_array_equal(_FORK_READER.read(np.array([0]), np.array([1])), data[[1]])
    _FORK_READER = None


_MEMORY_CHILD = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from cryo_lightning.io.stack_reader import StackReader

    path, n = sys.argv[1], int(sys.argv[2])
    reader = StackReader([path])
    with open("/proc/self/status") as f:
        vm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    limit = vm_kb * 1024 + (1 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:  # control: a whole-file map does not fit under the limit
        np.memmap(path, dtype=np.float32, mode="r")
        print("WHOLE_MAP_FITS")
    except (MemoryError, OSError, ValueError):
        print("WHOLE_MAP_REFUSED")
    chunk, total = 256, 0.0
    out = None
    for a in range(0, n, chunk):
        idx = np.arange(a, min(a + chunk, n))
        out = reader.read(np.zeros(len(idx), np.int64), idx)
        total += float(out[:, ::64, ::64].sum())
    rng = np.random.default_rng(0)
    for _ in range(8):
        idx = rng.integers(0, n, 64)
        total += float(reader.read(np.zeros(64, np.int64), idx).sum())
    # VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec and reports the forking pytest process.
    print("DONE", total, next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="needs Linux /proc")
def test_two_gb_stack_streams_under_one_gb_address_space(tmp_path):
    n, L = 8192, 256  # 2 GiB of float32
    path = tmp_path / "big.mrcs"
    try:
        # new_mmap only extends the file: a sparse file of zeros, written in milliseconds.
        with mrcfile.new_mmap(path, shape=(n, L, L), mrc_mode=2) as m:
            m.set_image_stack()
        assert path.stat().st_size == 1024 + n * L * L * 4
        info = read_stack_info(path)
        assert (info.n, info.ny, info.nx) == (n, L, L)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        root = Path(__file__).resolve().parents[2]
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, str(path), str(n)],
            capture_output=True, text=True, timeout=120, cwd=root, env=env,
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.split("\n")
        assert "WHOLE_MAP_REFUSED" in lines, proc.stdout
        done = next(line for line in lines if line.startswith("DONE")).split()
        total, max_rss_kb = float(done[1]), int(done[2])
        assert total == 0.0
        print(f"peak RSS {max_rss_kb / 1024:.0f} MiB streaming a 2 GiB stack")
        assert max_rss_kb < 1024 * 1024
    finally:
        path.unlink(missing_ok=True)


def test_long_scattered_run_and_short_reads(tmp_path, monkeypatch):
    data = np.random.default_rng(6).standard_normal((1500, 4, 4)).astype(np.float32)
    path = write_mrc_stack(tmp_path / "long.mrcs", data)
    reader = StackReader([path])
    idx = np.arange(1500)[::-1]  # one run, scattered over the output (several vectored reads)
    np.testing.assert_array_equal(reader.read(np.zeros(1500, np.int64), idx), data[idx])

    if hasattr(os, "preadv"):  # reads that stop early must be continued, not trusted
        real = os.preadv

        def short_preadv(fd, buffers, offset):
            return real(fd, [memoryview(buffers[0]).cast("B")[:100]], offset)

        monkeypatch.setattr(os, "preadv", short_preadv)
        idx = np.array([3, 4, 5, 9, 0, 0])
        got = StackReader([path]).read(np.zeros(6, np.int64), idx)
        monkeypatch.undo()
        np.testing.assert_array_equal(got, data[idx])


def test_stack_shrunk_after_its_header_was_read(tmp_path):
    path = write_mrc_stack(tmp_path / "a.mrcs", np.ones((6, 8, 8), np.float32))
    reader = StackReader([path])
    os.truncate(path, 1024 + 2 * 8 * 8 * 4)
    with pytest.raises(InputError, match="shorter than when its header was read"):
        reader.read(np.zeros(2, np.int64), np.array([4, 5]))
