"""`cryol preprocess` and `cryol export` on real fixtures: valid outputs, inputs untouched, clear errors."""

from __future__ import annotations

import hashlib
import shutil

import mrcfile
import numpy as np
import pytest
import starfile

from cryo_lightning.cli import main
from cryo_lightning.io.particles import read_particles


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def relion31(shared_data, tmp_path):
    folder = tmp_path / "input"
    folder.mkdir()
    for name in ("relion31.star", "relion31.mrcs"):
        shutil.copy(shared_data / "real" / "cryodrgn" / name, folder / name)
    return folder


def test_preprocess_downsamples_and_writes_relion31(relion31, tmp_path):
    before = _digests(relion31)
    out = tmp_path / "prep"
    main(["preprocess", "--star", str(relion31 / "relion31.star"), "--box", "64", "--out", str(out),
          "--phase-flip"])
    assert _digests(relion31) == before  # inputs untouched
    blocks = starfile.read(out / "relion31.star", always_dict=True)
    assert float(blocks["optics"]["rlnImagePixelSize"][0]) == pytest.approx(2.806 * 4)
    assert int(blocks["optics"]["rlnImageSize"][0]) == 64
    original = starfile.read(relion31 / "relion31.star", always_dict=True)["particles"]
    assert set(original.columns) <= set(blocks["particles"].columns)
    with mrcfile.open(out / "relion31.mrcs") as f:
        assert f.data.shape == (5, 64, 64) and float(f.voxel_size.x) == pytest.approx(2.806 * 4, rel=1e-4)
        # background-normalised by default
        ring = np.hypot(*np.meshgrid(np.arange(64) - 32, np.arange(64) - 32)) >= 24
        assert abs(float(f.data[:, ring].mean())) < 0.05
    again = read_particles(out / "relion31.star")
    assert again.particles["stack_name"].eq("relion31.mrcs").all()


def test_preprocess_refuses_overwrite_and_the_input(relion31, tmp_path, capsys):
    out = tmp_path / "prep"
    main(["preprocess", "--star", str(relion31 / "relion31.star"), "--out", str(out)])
    with pytest.raises(SystemExit) as err:
        main(["preprocess", "--star", str(relion31 / "relion31.star"), "--out", str(out)])
    assert err.value.code == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["preprocess", "--star", str(relion31 / "relion31.star"), "--out", str(relion31), "--overwrite"])
    assert "inputs are never overwritten" in capsys.readouterr().err


def test_user_errors_are_one_line_without_traceback(shared_data, tmp_path, capsys):
    star = shared_data / "real" / "ASPIRE-Python" / "sample_incomplete_ctf_params.star"
    with pytest.raises(SystemExit) as err:
        main(["preprocess", "--star", str(star), "--out", str(tmp_path)])
    message = capsys.readouterr().err
    assert err.value.code == 2 and "rlnVoltage" in message and str(star.name) in message
    assert "Traceback" not in message
    with pytest.raises(Exception) as full:  # --debug re-raises with the traceback
        main(["preprocess", "--star", str(star), "--out", str(tmp_path), "--debug"])
    assert "rlnVoltage" in str(full.value)


def test_export_random_subset(shared_data, tmp_path):
    star = shared_data / "real" / "cryodrgn" / "relion31.star"
    out = tmp_path / "half1.star"
    main(["export", "--star", str(star), "--random-subset", "1", "--out", str(out)])
    original = starfile.read(star, always_dict=True)["particles"]
    written = starfile.read(out, always_dict=True)["particles"]
    assert written["rlnImageName"].tolist() == original[original["rlnRandomSubset"] == 1]["rlnImageName"].tolist()


def test_phase_flipped_output_reads_back_as_phase_flipped(relion31, tmp_path):
    from cryo_lightning.data.particle_source import open_particles

    out = tmp_path / "flipped"
    main(["preprocess", "--star", str(relion31 / "relion31.star"), "--out", str(out), "--phase-flip"])
    assert open_particles(out / "relion31.star").stored_ctf_mode == "phase_flipped"


def test_assumed_values_are_written_and_read_back(shared_data, tmp_path):
    folder = tmp_path / "input"
    folder.mkdir()
    for name in ("relion31.star", "relion31.mrcs"):
        shutil.copy(shared_data / "real" / "cryodrgn" / name, folder / name)
    star = folder / "relion31.star"
    text = star.read_text().replace("_rlnAmplitudeContrast", "_rlnUnusedLabel")  # drop the column
    star.write_text(text)
    main(["preprocess", "--star", str(star), "--out", str(tmp_path / "o"), "--assume", "amplitude_contrast=0.07,voltage=300"])
    again = read_particles(tmp_path / "o" / "relion31.star")
    assert (again.particles["amp_contrast"] == 0.07).all()


def test_bad_assume_is_a_user_error(relion31, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["preprocess", "--star", str(relion31 / "relion31.star"), "--out", str(tmp_path / "o"), "--assume", "voltage"])
    assert err.value.code == 2 and "NAME=VALUE" in capsys.readouterr().err
