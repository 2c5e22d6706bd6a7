"""Issue 22, item 1: non-finite data never give a result with exit 0 that looks valid.

NaN/Inf images are found when particles are read, left out of every statistic, reconstruction
and output with a warning naming how many and which rows (refused with --strict); outputs are
checked finite before they are published; every JSON written is valid.
"""

from __future__ import annotations

import shutil

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryo_lightning.io.mrc import read_map, read_stack, write_map
from tests.reliability.conftest import leftovers, snapshot, strict_json, write_raw_stack


@pytest.fixture
def spoiled(dataset, tmp_path):
    """The dataset with image 4 holding one NaN pixel and image 9 an Inf pixel (1-based rows)."""
    folder = tmp_path / "in"
    shutil.copytree(dataset, folder)
    images = read_stack(folder / "particles.mrcs").numpy().copy()
    images[3, 5, 5] = np.nan
    images[8, 20, 7] = np.inf
    write_raw_stack(folder / "particles.mrcs", images, 6.0)
    return folder


def test_reconstruct_leaves_non_finite_images_out_and_writes_finite_maps_and_valid_json(cryol, spoiled, tmp_path):
    before = snapshot(spoiled)
    code, err = cryol("reconstruct", "--star", spoiled / "particles.star", "--out", tmp_path / "out" / "map.mrc")
    assert code == 0 and "Traceback" not in err
    assert "2 of 36 particle images hold NaN or Inf pixels (data rows 4, 9)" in err
    for name in ("map.mrc", "map_half1.mrc", "map_half2.mrc"):
        assert torch.isfinite(read_map(tmp_path / "out" / name).data).all()
    report = strict_json(tmp_path / "out" / "map_fsc.json")
    assert report["n_images"] == 34
    used = starfile.read(tmp_path / "out" / "map.star")["particles"]["rlnImageName"]
    assert not used.str.startswith(("000004@", "000009@")).any()
    assert snapshot(spoiled) == before


def test_strict_refuses_the_file_and_writes_nothing(cryol, spoiled, tmp_path):
    before = snapshot(spoiled)
    code, err = cryol("reconstruct", "--star", spoiled / "particles.star", "--out", tmp_path / "out" / "map.mrc",
                      "--strict")
    assert code == 2 and "Traceback" not in err
    assert "data rows 4, 9" in err and "--strict refuses" in err
    assert not (tmp_path / "out").exists() and snapshot(spoiled) == before


def test_preprocess_excludes_an_image_with_one_nan_pixel(cryol, spoiled, tmp_path):
    code, err = cryol("preprocess", "--star", spoiled / "particles.star", "--out", tmp_path / "prep")
    assert code == 0 and "data rows 4, 9" in err
    images = read_stack(tmp_path / "prep" / "particles.mrcs")
    assert images.shape[0] == 34 and torch.isfinite(images).all()
    names = starfile.read(tmp_path / "prep" / "particles.star")["particles"]["rlnImageName"]
    assert len(names) == 34


def test_every_image_non_finite_is_refused(cryol, dataset, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(dataset, folder)
    write_raw_stack(folder / "particles.mrcs", np.full((36, 32, 32), np.nan), 6.0)
    code, err = cryol("preprocess", "--star", folder / "particles.star", "--out", tmp_path / "prep")
    assert code == 2 and "36 of 36" in err and "no image is usable" in err and not (tmp_path / "prep").exists()


def test_evaluate_with_nan_denoised_images_leaves_them_out(cryol, dataset, tmp_path):
    """It used to end in a TypeError and leave outputs behind."""
    denoised = read_stack(dataset / "particles_clean.mrcs").numpy().copy()
    denoised[[1, 30]] = np.nan
    stack = write_raw_stack(tmp_path / "denoised.mrcs", denoised, 6.0)
    code, err = cryol("evaluate", "--particles", dataset / "particles.star", "--denoised", stack,
                      "--denoised-units", "raw", "--no-frc", "--out", tmp_path / "eval")
    assert code == 0 and "Traceback" not in err
    assert f"{stack}: 2 of 36 particle images hold NaN or Inf pixels (data rows 2, 31)" in err
    metrics = strict_json(tmp_path / "eval" / "metrics.json")
    assert metrics["particles"]["n_images"] == 34
    code, err = cryol("evaluate", "--particles", dataset / "particles.star", "--denoised", stack, "--strict",
                      "--denoised-units", "raw", "--no-frc", "--out", tmp_path / "eval2")
    assert code == 2 and "data rows 2, 31" in err and not (tmp_path / "eval2").exists()


def test_evaluate_refuses_non_finite_half_maps(cryol, tmp_path):
    volume = torch.randn(16, 16, 16)
    write_map(tmp_path / "h1.mrc", volume, 3.0)
    with mrcfile.new(tmp_path / "h2.mrc") as m:
        data = volume.numpy().copy()
        data[2, 2, 2] = np.nan
        m.set_data(data)
        m.voxel_size = 3.0
    code, err = cryol("evaluate", "--half-maps", tmp_path / "h1.mrc", tmp_path / "h2.mrc", "--out", tmp_path / "e")
    assert code == 2 and "h2.mrc: 1 NaN/Inf voxel" in err and not (tmp_path / "e").exists()


def test_float16_output_out_of_range_is_refused_not_written_as_inf(cryol, dataset, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(dataset, folder)
    write_raw_stack(folder / "particles.mrcs", read_stack(folder / "particles.mrcs").numpy() * 1e6, 6.0)
    before = snapshot(folder)
    code, err = cryol("preprocess", "--star", folder / "particles.star", "--out", tmp_path / "prep",
                      "--no-normalize", "--float16")
    assert code == 2 and "float16" in err and "Traceback" not in err
    assert not (tmp_path / "prep").exists() and not leftovers(tmp_path) and snapshot(folder) == before


def test_training_data_leave_non_finite_images_out_or_refuse_them(spoiled):
    from cryo_lightning.data.particles import ParticleDataModule
    from cryo_lightning.io.errors import InputError

    dm = ParticleDataModule(str(spoiled / "particles.star"), set_size=4, batch_size=2, val_fraction=0.0,
                            num_workers=0, return_ctf=False)
    dm.setup("fit")
    assert len(dm.source) == 34
    assert not np.isin(dm.source.table.particles["particle_id"], [3, 8]).any()
    for batch in dm.train_dataloader():
        assert torch.isfinite(batch["images"]).all()
    with pytest.raises(InputError, match="data rows 4, 9"):
        ParticleDataModule(str(spoiled / "particles.star"), set_size=4, num_workers=0, strict=True).setup("fit")
