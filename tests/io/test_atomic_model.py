from __future__ import annotations

import gemmi
import pytest
import torch

from cryo_lightning.io.atomic_model import read_atomic_model, rasterize_atomic_model

# Two models; model 1 has an alanine fragment (with one hydrogen), an iron and a water.
PDB = """\
MODEL        1
ATOM      1  N   ALA A   1      11.104   6.134  -6.504  1.00  0.00           N
ATOM      2  CA  ALA A   1      11.639   6.071  -5.147  1.00  0.00           C
ATOM      3  H   ALA A   1      10.500   6.000  -7.000  1.00  0.00           H
ATOM      4  O   ALA A   1      12.500   5.000  -4.800  1.00  0.00           O
HETATM    5 FE   HEM A 101      14.000   8.000  -2.000  1.00  0.00          FE
HETATM    6  O   HOH A 201      20.000  20.000  20.000  1.00  0.00           O
ENDMDL
MODEL        2
ATOM      1  N   ALA A   1      99.000  99.000  99.000  1.00  0.00           N
ENDMDL
END
"""

HEAVY_XYZ = [
    [11.104, 6.134, -6.504],
    [11.639, 6.071, -5.147],
    [12.500, 5.000, -4.800],
    [14.000, 8.000, -2.000],
]
HEAVY_Z = [7, 6, 8, 26]


@pytest.fixture
def pdb_path(tmp_path):
    path = tmp_path / "tiny.pdb"
    path.write_text(PDB)
    return path


@pytest.fixture
def cif_path(tmp_path, pdb_path):
    structure = gemmi.read_structure(str(pdb_path))
    structure.setup_entities()
    path = tmp_path / "tiny.cif"
    structure.make_mmcif_document().write_file(str(path))
    return path


@pytest.mark.parametrize("which", ["pdb", "cif"])
def test_read_first_model_without_hydrogens_and_waters(which, pdb_path, cif_path):
    model = read_atomic_model(pdb_path if which == "pdb" else cif_path)
    assert model.coords.dtype == torch.float32 and model.coords.shape == (4, 3)
    assert torch.allclose(model.coords, torch.tensor(HEAVY_XYZ), atol=1e-4)
    assert model.atomic_numbers.tolist() == HEAVY_Z
    assert model.weights.tolist() == [float(z) for z in HEAVY_Z]


def test_keep_hydrogens_and_waters(pdb_path):
    model = read_atomic_model(pdb_path, keep_hydrogens=True, keep_waters=True)
    assert model.atomic_numbers.tolist() == [7, 6, 1, 8, 26, 8]
    assert model.coords[-1].tolist() == [20.0, 20.0, 20.0]


def test_rasterised_centre_of_mass_at_box_centre(pdb_path):
    model = read_atomic_model(pdb_path)
    L, pixel = 24, 1.0
    vol = rasterize_atomic_model(model, L, pixel, resolution_A=4.0)
    assert vol.shape == (L, L, L) and vol.dtype == torch.float32
    # Electrons per A^3 integrate to the total atomic number.
    assert (vol.sum() * pixel**3).item() == pytest.approx(sum(HEAVY_Z), rel=1e-4)
    r = torch.arange(L, dtype=torch.float64) - L // 2
    z, y, x = torch.meshgrid(r, r, r, indexing="ij")
    w = vol.double() / vol.double().sum()
    com = [float((w * g).sum()) for g in (x, y, z)]
    assert com == pytest.approx([0.0, 0.0, 0.0], abs=1e-4)
    # Without centring the model sits at its file coordinates, mostly outside this box.
    off = rasterize_atomic_model(model, L, pixel, resolution_A=4.0, center=False)
    assert off.sum() * pixel**3 < 0.5 * sum(HEAVY_Z)


def test_unreadable_or_empty_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.pdb"
    empty.write_text("REMARK nothing here\nEND\n")
    with pytest.raises(ValueError, match="empty.pdb contains no atoms"):
        read_atomic_model(empty)
    waters = tmp_path / "waters.pdb"
    waters.write_text(
        "HETATM    1  O   HOH A 201      20.000  20.000  20.000  1.00  0.00           O\nEND\n"
    )
    with pytest.raises(ValueError, match="waters.pdb has no atoms left"):
        read_atomic_model(waters)
    broken = tmp_path / "broken.cif"
    broken.write_text("data_x\nloop_\n_atom_site.id\n_atom_site.Cartn_x\n1\n")
    with pytest.raises(ValueError, match="broken.cif"):
        read_atomic_model(broken)
    with pytest.raises(FileNotFoundError, match="missing.pdb"):
        read_atomic_model(tmp_path / "missing.pdb")
