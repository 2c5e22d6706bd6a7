"""`cryol simulate`: RELION 3.1 outputs that starfile/mrcfile open, consistent with the physics."""

from __future__ import annotations

import hashlib
import json

import mrcfile
import pytest
import starfile
import torch

from cryo_lightning.io.mrc import write_map
from cryo_lightning.physics.ctf import CTFParams, ctf_2d
from cryo_lightning.physics.image_formation import clean_images
from cryo_lightning.physics.noise import empirical_snr
from cryo_lightning.physics.projection import volume_spectrum
from cryo_lightning.physics.rotations import euler_to_matrix
from cryo_lightning.physics.volumes import random_molecule
from cryo_lightning.cli import main as cryol


def main(args):
    cryol(["simulate", *args])

ARGS = ["--n-images", "60", "--box", "32", "--pixel-size", "5.0", "--snr", "0.1", "--max-shift", "2",
        "--chunk-size", "25", "--seed", "4"]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    main(["--volume", "random", "--out", str(out), *ARGS])
    return out


def test_outputs_are_relion31(simulated):
    blocks = starfile.read(simulated / "particles.star", always_dict=True)
    assert list(blocks) == ["optics", "particles"]
    optics, particles = blocks["optics"], blocks["particles"]
    for col in ("rlnOpticsGroup", "rlnOpticsGroupName", "rlnImagePixelSize", "rlnImageSize",
                "rlnImageDimensionality", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        assert col in optics, col
    assert float(optics["rlnImagePixelSize"][0]) == 5.0 and int(optics["rlnImageSize"][0]) == 32
    for col in ("rlnImageName", "rlnOpticsGroup", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
                "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
        assert col in particles, col
    assert len(particles) == 60
    assert particles["rlnImageName"][0] == "000001@particles.mrcs"
    assert particles["rlnImageName"][59] == "000060@particles.mrcs"
    for name in ("particles.mrcs", "particles_clean.mrcs"):
        with mrcfile.open(simulated / name) as f:  # strict open: valid headers
            assert f.data.shape == (60, 32, 32) and f.header.ispg == 0
            assert float(f.voxel_size.x) == pytest.approx(5.0)
    with mrcfile.open(simulated / "volume.mrc") as f:
        assert f.data.shape == (32, 32, 32) and float(f.voxel_size.x) == pytest.approx(5.0)


def _stack(path):
    with mrcfile.open(path) as f:
        return torch.from_numpy(f.data.copy())


def test_clean_stack_equals_projector_output(simulated):
    """Recompute the clean images from volume.mrc and the STAR values alone."""
    blocks = starfile.read(simulated / "particles.star", always_dict=True)
    optics, p = blocks["optics"], blocks["particles"]
    columns = {c: p[c].to_numpy() for c in p.columns if c.startswith("rlnDefocus") or c.startswith("rlnCtf")
               or c == "rlnPhaseShift"}
    columns.update({c: float(optics[c][0]) for c in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")})
    ctf = ctf_2d(CTFParams.from_dict(columns), 32, 5.0)
    angles = torch.tensor(p[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(), dtype=torch.float64)
    origins = torch.tensor(p[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(), dtype=torch.float32) / 5.0
    volume = _stack(simulated / "volume.mrc")
    expected = clean_images(volume_spectrum(volume), euler_to_matrix(angles).float(), ctf, origins)
    got = _stack(simulated / "particles_clean.mrcs")
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_measured_snr_and_report(simulated):
    clean, noisy = _stack(simulated / "particles_clean.mrcs"), _stack(simulated / "particles.mrcs")
    measured = float(empirical_snr(clean, noisy, dim=0))
    assert measured == pytest.approx(0.1, rel=0.05)
    report = json.loads((simulated / "simulation.json").read_text())
    assert report["measured_snr"] == pytest.approx(0.1, rel=0.05)
    assert report["settings"]["n_images"] == 60


def test_reproducible_by_seed(simulated, tmp_path):
    main(["--volume", "random", "--out", str(tmp_path), *ARGS, "--chunk-size", "60"])
    for name in ("particles.mrcs", "particles_clean.mrcs"):
        torch.testing.assert_close(_stack(tmp_path / name), _stack(simulated / name), rtol=0, atol=1e-6)


def test_refuses_to_overwrite(simulated, capsys):
    before = (simulated / "particles.star").read_bytes()
    with pytest.raises(SystemExit) as err:
        main(["--volume", "random", "--out", str(simulated), *ARGS])
    assert err.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (simulated / "particles.star").read_bytes() == before


def test_from_map_leaves_input_untouched(tmp_path):
    source = tmp_path / "input.mrc"
    write_map(source, random_molecule(40, torch.Generator().manual_seed(0)), pixel_size=4.0)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    out = tmp_path / "out"
    main(["--volume", str(source), "--out", str(out), "--n-images", "8", "--box", "32",
          "--pixel-size", "5.0", "--snr", "1", "--no-ctf"])
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
    particles = starfile.read(out / "particles.star", always_dict=True)["particles"]
    assert "rlnDefocusU" not in particles  # no CTF simulated, none recorded


def test_from_atomic_model(tmp_path):
    pdb = tmp_path / "model.pdb"
    lines = [f"ATOM  {i + 1:5d}  CA  ALA A{i + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           C"
             for i, (x, y, z) in enumerate([(0, 0, 0), (3.8, 0, 0), (3.8, 3.8, 0), (0, 3.8, 3.8), (7.6, 1, 2)])]
    pdb.write_text("\n".join(lines) + "\nEND\n")
    out = tmp_path / "out"
    main(["--volume", str(pdb), "--out", str(out), "--n-images", "4", "--box", "16",
          "--pixel-size", "2.0", "--snr", "1"])
    assert _stack(out / "volume.mrc").sum() > 0


def test_missing_volume_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--volume", str(tmp_path / "nope.mrc"), "--out", str(tmp_path / "o"), "--n-images", "2",
              "--box", "16", "--pixel-size", "2", "--snr", "1"])
    assert "nope.mrc" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--pixel-size", "-2"], "--pixel-size must be a positive number of Angstrom, got -2.0"),
    (["--defocus-min", "25000", "--defocus-max", "5000"], "--defocus-min 25000 is larger than --defocus-max 5000: swap"),
    (["--defocus-min", "1.5", "--defocus-max", "2.5"], "did you mean micrometres?"),
    (["--voltage", "300000"], "--voltage 300000 is outside [20, 1000] kV"),
    (["--amplitude-contrast", "7"], "--amplitude-contrast 7 is not a fraction in [0, 1]"),
    (["--snr", "0"], "--snr must be > 0"),
])
def test_impossible_settings_are_refused_before_any_output(tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    args = {"--n-images": "2", "--box": "16", "--pixel-size": "2", "--snr": "1"}
    for i in range(0, len(extra), 2):
        args[extra[i]] = extra[i + 1]
    with pytest.raises(SystemExit) as err:
        main(["--volume", "random", "--out", str(out), *(x for kv in args.items() for x in kv)])
    assert err.value.code == 2
    text = capsys.readouterr().err
    assert message in text and "Traceback" not in text
    assert not out.exists()
