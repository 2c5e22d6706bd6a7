"""ParticleDataModule: real fixtures end to end, DDP sharding, the float16 cache, bounded memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from cryo_lightning.data.particles import ParticleDataModule

from cryo_lightning.data.particle_source import open_particles
from cryo_lightning.data.preprocess import PreprocessConfig
from cryo_lightning.io.errors import InputError
from cryo_lightning.io.star import image_names, optics_block, write_particles_star


def _batches(dm: ParticleDataModule, loader) -> list[dict]:
    return [dm.on_after_batch_transfer(b, 0) for b in loader]


def test_relion31_fixture_end_to_end(shared_data):
    star = shared_data / "real" / "cryodrgn" / "relion31.star"
    dm = ParticleDataModule(str(star), set_size=1, batch_size=5, val_fraction=0.0, num_workers=0,
                            preprocess=PreprocessConfig(normalize=False))
    dm.setup("predict")
    (batch,) = _batches(dm, dm.predict_dataloader())
    with mrcfile.open(star.parent / "relion31.mrcs", permissive=True) as f:
        raw = torch.from_numpy(f.data.copy())
    torch.testing.assert_close(batch["noisy"][:, 0], raw)  # data sign +1, no processing
    assert batch["ctf_mode"] == "full" and batch["ctf"].shape == (5, 1, 256, 256)
    torch.testing.assert_close(batch["pixel_size"], torch.full((5, 1), 2.806))
    assert batch["rotations"].shape == (5, 1, 3, 3)


def test_cryosparc_data_sign_and_downsampling(shared_data):
    folder = shared_data / "real" / "cryodrgn"
    dm = ParticleDataModule(str(folder / "empiar_10076_7.cs"), set_size=1, batch_size=7, val_fraction=0.0,
                            num_workers=0, preprocess=PreprocessConfig(out_box=64, normalize=False))
    dm.setup("predict")
    (batch,) = _batches(dm, dm.predict_dataloader())
    assert batch["noisy"].shape == (7, 1, 64, 64)
    torch.testing.assert_close(batch["pixel_size"], torch.full((7, 1), 1.31 * 5), rtol=1e-5, atol=0)
    with mrcfile.open(folder / "empiar_10076_7.mrc", permissive=True) as f:
        mean = torch.from_numpy(f.data.astype(np.float32)).mean((-1, -2))
    # blob/sign = -1 (dark protein) is applied: means flip sign (Fourier cropping keeps means)
    torch.testing.assert_close(batch["noisy"][:, 0].mean((-1, -2)), -mean, atol=1e-4, rtol=1e-4)


def test_missing_stacks_and_box_mismatch_fail_before_work(shared_data):
    folder = shared_data / "real" / "cryodrgn"
    with pytest.raises(InputError, match="--datadir"):
        open_particles(folder / "relion5.star")
    with pytest.raises(InputError, match="448"):
        open_particles(folder / "relion5.star", datadir=folder / "toy_datadir")


def _synthetic_star(tmp_path: Path, n: int = 40, L: int = 16, stacks: int = 2) -> Path:
    per = n // stacks
    rows = []
    rng = np.random.default_rng(0)
    for s in range(stacks):
        data = (rng.standard_normal((per, L, L)) + np.arange(s * per, (s + 1) * per)[:, None, None]).astype(np.float32)
        with mrcfile.new(tmp_path / f"stack{s}.mrcs", data=data) as f:
            f.set_image_stack()
        rows += image_names(f"stack{s}.mrcs", per)
    particles = pd.DataFrame({"rlnImageName": rows, "rlnOpticsGroup": 1,
                              "rlnDefocusU": 15000.0, "rlnDefocusV": 14000.0, "rlnDefocusAngle": 30.0})
    path = tmp_path / "particles.star"
    write_particles_star(path, optics_block(2.0, L, 300, 2.7, 0.1), particles)
    return path


def test_sets_cover_each_particle_once_and_ddp_ranks_are_disjoint(tmp_path):
    path = _synthetic_star(tmp_path)
    dm = ParticleDataModule(str(path), set_size=4, batch_size=2, val_fraction=0.0, num_workers=0,
                            preprocess=PreprocessConfig(normalize=False))
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    assert sorted(dataset.sets.reshape(-1).tolist()) == list(range(40))
    # every image is the particle it claims to be (stack values encode the row)
    batch = dataset.__getitems__([0, 3])
    torch.testing.assert_close(batch["images"].mean((-1, -2)), batch["particle_id"].float(), atol=0.3, rtol=0)
    seen = []
    for rank in range(2):  # what Lightning's DistributedSampler gives each rank
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        seen.append({int(i) for i in sampler})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == len(dataset)


def test_float16_cache_gives_the_same_images(tmp_path):
    path = _synthetic_star(tmp_path)
    plain = ParticleDataModule(str(path), set_size=1, batch_size=40, val_fraction=0.0, num_workers=0,
                               preprocess=PreprocessConfig(normalize=False))
    cached = ParticleDataModule(str(path), set_size=1, batch_size=40, val_fraction=0.0, num_workers=0,
                                preprocess=PreprocessConfig(normalize=False), cache_dir=str(tmp_path / "scratch"))
    cached.prepare_data()
    for dm in (plain, cached):
        dm.setup("predict")
    a = _batches(plain, plain.predict_dataloader())[0]["noisy"]
    b = _batches(cached, cached.predict_dataloader())[0]["noisy"]
    assert list((tmp_path / "scratch").glob("cryol_cache_*.mrcs"))
    torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-2)  # float16 rounding


def test_validation_split_is_disjoint_and_seeded(tmp_path):
    path = _synthetic_star(tmp_path)
    dm = ParticleDataModule(str(path), set_size=2, batch_size=2, val_fraction=0.25, num_workers=0)
    dm.setup("fit")
    assert len(dm.val_rows) == 10 and not set(dm.val_rows) & set(dm.train_rows)
    again = ParticleDataModule(str(path), set_size=2, batch_size=2, val_fraction=0.25, num_workers=0)
    again.setup("fit")
    assert np.array_equal(dm.val_rows, again.val_rows)


_MEMORY_CHILD = r"""
import resource, sys
from cryo_lightning.data.particles import ParticleDataModule
from cryo_lightning.data.preprocess import PreprocessConfig
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.RLIM_INFINITY))
dm = ParticleDataModule(sys.argv[1], set_size=8, batch_size=4, val_fraction=0.0, num_workers=0,
                        preprocess=PreprocessConfig(normalize=True))
dm.setup("predict")
count = 0
for batch in dm.predict_dataloader():
    count += dm.on_after_batch_transfer(batch, 0)["noisy"].shape[0] * 8
# VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec and reports the forking pytest process.
print("DONE", count, next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="needs Linux /proc")
def test_two_gb_stack_streams_through_the_datamodule_under_one_gb(tmp_path):
    n, L = 8192, 256  # 2 GiB of float32 (a sparse file: zeros)
    stack = tmp_path / "big.mrcs"
    try:
        with mrcfile.new_mmap(stack, shape=(n, L, L), mrc_mode=2) as m:
            m.set_image_stack()
        star = tmp_path / "big.star"
        particles = pd.DataFrame({"rlnImageName": image_names("big.mrcs", n), "rlnOpticsGroup": 1,
                                  "rlnDefocusU": 15000.0, "rlnDefocusV": 15000.0})
        write_particles_star(star, optics_block(1.0, L, 300, 2.7, 0.1), particles)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(star)], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        done = next(l for l in proc.stdout.splitlines() if l.startswith("DONE")).split()
        assert int(done[1]) == n
        print(f"peak RSS {int(done[2]) / 1024:.0f} MiB streaming a 2 GiB stack through the datamodule")
        assert int(done[2]) < 1024 * 1024  # peak RSS (KiB) below 1 GiB
    finally:
        stack.unlink(missing_ok=True)
