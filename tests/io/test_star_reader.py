"""RELION STAR reading into the canonical particle table: every STAR fixture, plus synthetic edge cases.

Expected numbers come from the fixtures' README (shared/data/real/README.md) and from the files'
own columns, read independently with ``starfile``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from cryo_lightning.io.errors import InputError
from cryo_lightning.io.particle_table import ParticleTable
from cryo_lightning.io.particles import read_particles
from cryo_lightning.io.star_reader import read_star


def assert_canonical(table: ParticleTable) -> None:
    table.validate()  # columns, dtypes and values of the canonical table
    df = table.particles
    assert (df["particle_id"].to_numpy() == np.arange(len(df))).all()
    assert len(table.blocks[table.particle_block]) == len(df)


def load(shared_data: Path, rel: str, **kwargs) -> ParticleTable:
    table = read_particles(shared_data / "real" / rel, **kwargs)
    assert_canonical(table)
    return table


def raw(shared_data: Path, rel: str) -> dict:
    return starfile.read(shared_data / "real" / rel, always_dict=True)


# --- RELION 3.0 -------------------------------------------------------------------------------


def test_empiar_10076_7(shared_data):
    t = load(shared_data, "cryodrgn/empiar_10076_7.star")
    p = t.particles
    assert len(t) == 7 and t.format == "relion-3.0" and t.particle_block == ""
    assert t.pixel_size_source == "rlnDetectorPixelSize * 1e4 / rlnMagnification"
    np.testing.assert_allclose(p.pixel_size_A, 5 * 1e4 / 38168)
    assert p.pixel_size_A.round(2).eq(1.31).all()
    assert t.has_ctf and not t.warnings
    assert (p.voltage_kV == 300).all() and (p.cs_mm == 2.7).all() and (p.amp_contrast == 0.07).all()
    np.testing.assert_allclose(p.defocus_angle_deg, 5.28)
    assert p.defocus_u_A.iloc[0] == 15301.1 and p.defocus_v_A.iloc[0] == 14916.4
    assert p.image_name.tolist()[:2] == ["1@empiar_10076_7.mrc", "2@empiar_10076_7.mrc"]
    assert (p.stack_name == "empiar_10076_7.mrc").all()
    assert p.stack_index.tolist() == list(range(7))
    assert (p.data_sign == 1).all() and (p.optics_group == 1).all() and (p.box_px == -1).all()
    assert p[["rot_deg", "tilt_deg", "psi_deg"]].isna().all().all()
    assert (p[["shift_x_A", "shift_y_A"]] == 0).all().all()
    assert p.micrograph_name.tolist()[:2] == ["1", "2"]  # numeric-looking names stay text
    assert (p[["phase_shift_deg", "ctf_bfactor_A2"]] == 0).all().all() and (p.ctf_scale == 1).all()


def test_pfcrt_missing_amplitude_contrast(shared_data):
    rel = "cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star"
    with pytest.raises(InputError, match=r"rlnAmplitudeContrast.*--assume amplitude_contrast=") as err:
        load(shared_data, rel)
    assert "PfCRT.star" in str(err.value)
    t = load(shared_data, rel, assume={"amplitude_contrast": 0.1})
    p, block = t.particles, raw(shared_data, rel)["images"]
    assert len(t) == 5 and t.particle_block == "images" and t.format == "relion-3.0"
    np.testing.assert_allclose(p.pixel_size_A, 1.035)
    assert (p.amp_contrast == 0.1).all() and (p.cs_mm == 0.001).all()
    assert any("amplitude_contrast=0.1" in w for w in t.warnings)
    # RELION 3.0 origins are pixels: x pixel size gives Angstrom, same sign.
    np.testing.assert_allclose(p.shift_x_A, block["rlnOriginX"] * 1.035)
    np.testing.assert_allclose(p.shift_y_A, block["rlnOriginY"] * 1.035)
    assert p.stack_index.tolist() == list(range(5))


def test_sta_testing_bin8(shared_data):
    rel = "cryodrgn/sta_testing_bin8.star"
    t = load(shared_data, rel)
    block = raw(shared_data, rel)[""]
    assert len(t) == 219
    np.testing.assert_allclose(t.particles.pixel_size_A, 1.96)  # as written; the stack layer flags the 8x bin
    np.testing.assert_allclose(t.particles.ctf_scale, block["rlnCtfScalefactor"])
    np.testing.assert_allclose(t.particles.ctf_bfactor_A2, block["rlnCtfBfactor"])
    assert t.particles.ctf_bfactor_A2.iloc[1] == -26


def test_toy_projections_needs_pixel_size(shared_data):
    rel = "cryodrgn/toy_projections_dir.star"
    with pytest.raises(InputError, match="pass --pixel-size") as err:
        load(shared_data, rel)
    assert "toy_projections_dir.star" in str(err.value)
    t = load(shared_data, rel, pixel_size=1.0)
    p = t.particles
    assert len(t) == 1000 and t.pixel_size_source == "--pixel-size override"
    assert (p.pixel_size_A == 1).all() and (p.defocus_u_A == 0).all() and (p.defocus_v_A == 0).all()
    assert (p.phase_shift_deg == 90).all()
    assert p.stack_name.value_counts().to_dict() == {"toy_images_b.mrcs": 900, "toy_images_a.mrcs": 100}


def test_aspire_relion30_per_particle_voltage(shared_data):
    rel = "ASPIRE-Python/sample_particles_relion30.star"
    t = load(shared_data, rel)
    p, block = t.particles, raw(shared_data, rel)["model_class_1"]
    assert len(t) == 17 and t.particle_block == "model_class_1" and t.format == "relion-3.0"
    assert p.voltage_kV.tolist() == [300.0] * 8 + [200.0] * 9
    np.testing.assert_allclose(p.pixel_size_A, 5.0 * 1e4 / 37369.207031)
    np.testing.assert_allclose(p.pixel_size_A, 1.338, rtol=1e-5)
    np.testing.assert_allclose(p.shift_x_A, block["rlnOriginX"] * p.pixel_size_A)
    np.testing.assert_allclose(p.psi_deg, block["rlnAnglePsi"])
    assert (p.random_subset == block["rlnRandomSubset"]).all() and (p.class_number == 1).all()


def test_aspire_symmetry_file_matches_relion30(shared_data):
    a = load(shared_data, "ASPIRE-Python/sample_particles_relion30.star")
    b = load(shared_data, "ASPIRE-Python/sample_relion_symmetry_group_D4.star")
    pd.testing.assert_frame_equal(a.particles, b.particles)
    assert "rlnSymmetryGroup" in b.blocks["model_class_1"].columns


def test_aspire_incomplete_ctf(shared_data):
    rel = "ASPIRE-Python/sample_incomplete_ctf_params.star"
    with pytest.raises(InputError, match=r"missing rlnVoltage.*--assume voltage="):
        load(shared_data, rel)
    t = load(shared_data, rel, assume={"voltage": 300})
    assert len(t) == 1 and t.particles.voltage_kV.iloc[0] == 300


def test_ap_s_c2d(shared_data):
    t = load(shared_data, "relion/ap_s_c2d.star")
    block = t.blocks[""]
    p = t.particles
    assert len(t) == 8915 and p.stack_name.nunique() == 15
    np.testing.assert_allclose(p.pixel_size_A, 14 * 1e4 / 39548)
    assert (p.pixel_size_A.round(2) == 3.54).all()
    assert (p.voltage_kV == 300).all() and (p.cs_mm == 2).all() and (p.amp_contrast == 0.1).all()
    np.testing.assert_allclose(p.shift_y_A, block["rlnOriginY"] * p.pixel_size_A)
    # The reduced file is 9 of these particles with identical values.
    red = load(shared_data, "relion/ap_s_c2d_red.star").particles
    full = p.set_index("image_name").loc[red.image_name]
    cols = ["defocus_u_A", "psi_deg", "shift_x_A", "class_number"]
    np.testing.assert_array_equal(full[cols].to_numpy(), red[cols].to_numpy())


def test_one_loop_windows_paths_without_at(shared_data):
    t = load(shared_data, "starfile/one_loop.star")
    p = t.particles
    assert len(t) == 16 and (p.stack_index == 0).all()
    assert (p.stack_name == p.image_name).all() and p.stack_name.str.startswith("F:/WM5984").all()
    np.testing.assert_allclose(p.pixel_size_A, 5.0)
    assert not t.has_ctf and p.defocus_u_A.isna().all() and any("no CTF" in w for w in t.warnings)


# --- RELION 3.1 / 4 / 5 -----------------------------------------------------------------------


def test_relion31_block_order_does_not_matter(shared_data):
    a = load(shared_data, "cryodrgn/relion31.star")
    b = load(shared_data, "cryodrgn/relion31.v2.star")
    assert list(a.blocks) == ["optics", "particles"] and list(b.blocks) == ["particles", "optics"]
    pd.testing.assert_frame_equal(a.particles, b.particles)
    p, block = a.particles, a.blocks["particles"]
    assert len(a) == 5 and a.format == "relion-3.1" and a.particle_block == "particles"
    assert a.pixel_size_source == "rlnImagePixelSize of the optics group"
    assert (p.pixel_size_A == 2.806).all() and (p.cs_mm == 0.01).all() and (p.box_px == 256).all()
    assert (p.stack_name == "relion31.mrcs").all() and p.stack_index.tolist() == list(range(5))
    np.testing.assert_array_equal(p.shift_x_A, block["rlnOriginXAngst"])
    np.testing.assert_array_equal(p.shift_y_A, block["rlnOriginYAngst"])
    np.testing.assert_array_equal(p.rot_deg, block["rlnAngleRot"])
    np.testing.assert_array_equal(p.defocus_angle_deg, block["rlnDefocusAngle"])


def test_relion31_six_optics_groups(shared_data):
    t = load(shared_data, "cryodrgn/relion31.6opticsgroups.star")
    p = t.particles
    assert len(t) == 139
    # Read by hand from data_optics: group -> (pixel size, Cs); group numbers differ from names.
    by_group = {1: (1.25, 2.7), 2: (1.24, 2.7), 3: (1.25, 2.7), 4: (1.25, 2.6), 5: (1.24, 2.7), 6: (1.25, 2.7)}
    for row, group in ((0, 6), (59, 2), (136, 4)):
        assert p.optics_group.iloc[row] == group
        assert (p.pixel_size_A.iloc[row], p.cs_mm.iloc[row]) == by_group[group]
    expected = np.array([by_group[g] for g in p.optics_group])
    np.testing.assert_array_equal(p[["pixel_size_A", "cs_mm"]].to_numpy(), expected)
    assert set(p.pixel_size_A) == {1.24, 1.25} and set(p.cs_mm) == {2.6, 2.7}
    assert (p.voltage_kV == 200).all() and (p.box_px == 196).all()
    assert not p.ctf_premultiplied.any()  # rlnCtfDataAreCtfPremultiplied is 0 in every group
    assert p.image_name.iloc[0] == "3@Polish/job520/Micrographs/0003_shiny.mrcs"
    assert p.stack_index.iloc[0] == 2 and p.stack_name.iloc[0] == "Polish/job520/Micrographs/0003_shiny.mrcs"


def test_relion5(shared_data):
    t = load(shared_data, "cryodrgn/relion5.star")
    p = t.particles
    assert len(t) == 17 and t.format == "relion-3.1"
    assert (p.pixel_size_A == 0.89).all() and (p.box_px == 448).all()  # 448 as written (stacks are 30 px)
    assert (p.voltage_kV == 100).all() and (p.cs_mm == 1.6).all()
    assert set(p.stack_name) == {"toy_images_a.mrcs", "toy_images_b.mrcs"}
    assert p.image_name.iloc[0] == "1@toy_images_a.mrcs" and p.stack_index.iloc[1] == 1


def test_aspire_relion31_two_groups_tabs(shared_data):
    t = load(shared_data, "ASPIRE-Python/sample_particles_relion31.star")
    p, block = t.particles, t.blocks["particles"]
    assert len(t) == 17 and (p.pixel_size_A == 1.4).all()
    assert set(p.optics_group) == {1, 2}
    np.testing.assert_array_equal(p.voltage_kV, p.optics_group.map({1: 300.0, 2: 200.0}))
    np.testing.assert_array_equal(p.shift_x_A, block["rlnOriginXAngst"])
    # Same particles and CTF as the 3.0 file.
    r30 = load(shared_data, "ASPIRE-Python/sample_particles_relion30.star").particles
    np.testing.assert_array_equal(p.voltage_kV, r30.voltage_kV)
    np.testing.assert_array_equal(p.defocus_u_A, r30.defocus_u_A)


@pytest.mark.parametrize("box", [64, 65])
@pytest.mark.parametrize("kind", ["centered", "shifted"])
def test_rln_proj_with_optics(shared_data, box, kind):
    rel = f"ASPIRE-Python/rln_proj_{box}_{kind}.star"
    t = load(shared_data, rel)
    p, block = t.particles, t.blocks["particles"]
    assert len(t) == 4 and (p.pixel_size_A == 1.0).all() and (p.box_px == box).all()
    # Optics give voltage and Cs but there is no defocus: no CTF, with a warning.
    assert not t.has_ctf and p.voltage_kV.isna().all() and any("no defocus" in w for w in t.warnings)
    if "rlnOriginXAngst" in block.columns:
        np.testing.assert_array_equal(p.shift_x_A, block["rlnOriginXAngst"])
    else:
        np.testing.assert_array_equal(p.shift_x_A, block["rlnOriginX"] * 1.0)
        np.testing.assert_array_equal(p.shift_y_A, block["rlnOriginY"] * 1.0)
        assert p.shift_x_A.tolist() == [6, 10, -8, -13]
    angles = block[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    np.testing.assert_array_equal(p[["rot_deg", "tilt_deg", "psi_deg"]].to_numpy(), angles)


@pytest.mark.parametrize("box", [64, 65])
def test_rln_proj_particles_only(shared_data, box):
    rel = f"ASPIRE-Python/rln_proj_{box}.star"
    with pytest.raises(InputError, match="pass --pixel-size"):
        load(shared_data, rel)
    t = load(shared_data, rel, pixel_size=5.0)
    assert len(t) == 5 and t.format == "relion-3.1" and not t.has_ctf and (t.particles.box_px == -1).all()


def test_trpv1_optics_group_7(shared_data):
    t = load(shared_data, "cryojax/trpv1_small_stack.star")
    p = t.particles
    assert len(t) == 10 and (p.optics_group == 7).all()
    assert (p.pixel_size_A == 4.88).all() and (p.box_px == 48).all() and (p.voltage_kV == 300).all()
    assert (p.stack_name == "./batch_0_restacked.mrc").all()  # kept as written
    assert set(p.random_subset) == {1, 2}


def test_cryojax_particles_before_optics_tabs(shared_data):
    t = load(shared_data, "cryojax/test_starfile.star")
    p = t.particles
    assert list(t.blocks) == ["particles", "optics"]
    assert p.image_name.tolist() == [f"000000{i}@000000.mrcs" for i in (1, 2, 3)]
    assert p.stack_index.tolist() == [0, 1, 2] and (p.stack_name == "000000.mrcs").all()
    assert (p.ctf_scale == 2).all() and (p.pixel_size_A == 12).all() and (p.box_px == 16).all()


@pytest.mark.parametrize(
    "rel, blocks",
    [
        ("ASPIRE-Python/sample_data_model.star", "data_model_general"),
        ("starfile/postprocess.star", "data_general, data_fsc, data_guinier"),
        ("starfile/default_pipeline.star", "data_pipeline_general"),
        ("starfile/empty_loop.star", "data_"),  # an empty loop without rlnImageName
        ("starfile/loop_double_quote.star", "data_"),
        ("starfile/two_single_line_loop_blocks.star", "data_block_0"),
    ],
)
def test_not_a_particle_file(shared_data, rel, blocks):
    with pytest.raises(InputError, match="is not a particle STAR file") as err:
        load(shared_data, rel)
    assert Path(rel).name in str(err.value) and blocks in str(err.value)
    assert "expected a data_particles block" in str(err.value)


@pytest.mark.parametrize(
    "rel", ["starfile/rln3.1_data_style.star", "starfile/single_line_middle_of_multiblock.star"]
)
def test_several_image_blocks_are_ambiguous(shared_data, rel):
    with pytest.raises(InputError, match="several blocks hold rlnImageName"):
        load(shared_data, rel)


# --- synthetic edge cases ---------------------------------------------------------------------

OPTICS = """
data_optics

loop_
_rlnOpticsGroup
_rlnVoltage
_rlnSphericalAberration
_rlnAmplitudeContrast
_rlnImagePixelSize
_rlnImageSize
{optics_rows}
"""


def write_star(tmp_path: Path, particles: str, optics_rows: str | None = "1 300 2.7 0.1 1.5 64") -> Path:
    text = (OPTICS.format(optics_rows=optics_rows) if optics_rows is not None else "") + particles
    path = tmp_path / "p.star"
    path.write_text(text)
    return path


def particles_block(columns: list[str], rows: list[str]) -> str:
    return "\ndata_particles\n\nloop_\n" + "".join(f"_{c}\n" for c in columns) + "\n".join(rows) + "\n"


def test_particle_value_overrides_optics(tmp_path):
    block = particles_block(
        ["rlnImageName", "rlnOpticsGroup", "rlnDefocusU", "rlnVoltage", "rlnImagePixelSize"],
        ["1@a.mrcs 1 10000 200 9.0", "2@a.mrcs 1 12000 200 9.0"],
    )
    t = read_star(write_star(tmp_path, block))
    assert (t.particles.voltage_kV == 200).all()  # particle table wins (RELION CTF::readValue)
    assert (t.particles.pixel_size_A == 1.5).all()  # but the documented pixel order puts optics first
    assert (t.particles.defocus_v_A == t.particles.defocus_u_A).all()
    assert any("no rlnDefocusV" in w for w in t.warnings) and any("no rlnDefocusAngle" in w for w in t.warnings)
    assert (t.particles.defocus_angle_deg == 0).all()


def test_pixel_size_in_particle_table_and_override(tmp_path):
    block = particles_block(["rlnImageName", "rlnImagePixelSize"], ["1@a.mrcs 2.5"])
    t = read_star(write_star(tmp_path, block, optics_rows=None))
    assert t.pixel_size_source == "rlnImagePixelSize in the particle table" and t.particles.pixel_size_A[0] == 2.5
    t = read_star(write_star(tmp_path, block, optics_rows=None), pixel_size=3.0)
    assert t.particles.pixel_size_A[0] == 3.0 and any("overrides" in w for w in t.warnings)
    with pytest.raises(InputError, match="--pixel-size -1"):
        read_star(write_star(tmp_path, block, optics_rows=None), pixel_size=-1)


def test_no_optics_group_column(tmp_path):
    block = particles_block(["rlnImageName", "rlnDefocusU", "rlnDefocusV"],
                            ["1@a.mrcs 10000 12000", "2@a.mrcs 13000 14000"])
    t = read_star(write_star(tmp_path, block))  # a single optics row applies to all
    assert (t.particles.pixel_size_A == 1.5).all() and (t.particles.voltage_kV == 300).all()
    with pytest.raises(InputError, match="no rlnOpticsGroup column but data_optics has 2 groups"):
        read_star(write_star(tmp_path, block, optics_rows="1 300 2.7 0.1 1.5 64\n2 200 2.7 0.1 1.5 64"))


def test_unknown_optics_group(tmp_path):
    block = particles_block(["rlnImageName", "rlnOpticsGroup"], ["1@a.mrcs 1", "2@a.mrcs 3"])
    with pytest.raises(InputError, match=r"data row 2 .* rlnOpticsGroup 3, which is not in data_optics"):
        read_star(write_star(tmp_path, block))


def test_image_name_forms(tmp_path):
    block = particles_block(
        ["rlnImageName", "rlnCtfDataAreCtfPremultiplied"],
        ["7@Extract/job1/a.mrcs:mrcs 1", "0000012@C:\\data\\b.mrcs 1", "single.mrc 1", "3@>J1/c.mrc 1"],
    )
    p = read_star(write_star(tmp_path, block)).particles
    assert p.stack_name.tolist() == ["Extract/job1/a.mrcs", "C:\\data\\b.mrcs", "single.mrc", "J1/c.mrc"]
    assert p.stack_index.tolist() == [6, 11, 0, 2]
    assert p.image_name.iloc[0] == "7@Extract/job1/a.mrcs:mrcs"  # kept as written
    assert p.ctf_premultiplied.all()


@pytest.mark.parametrize("name", ["0@a.mrcs", "x@a.mrcs", "1.5@a.mrcs", "-2@a.mrcs", "3@"])
def test_bad_image_number(tmp_path, name):
    block = particles_block(["rlnImageName"], ["1@a.mrcs", name])
    with pytest.raises(InputError, match=r"rlnImageName in data row 2 is") as err:
        read_star(write_star(tmp_path, block))
    assert name in str(err.value) and "p.star" in str(err.value)


def test_non_numeric_value(tmp_path):
    rows = ["1@a.mrcs 10000", "2@a.mrcs 12000", "3@a.mrcs abc"]
    block = particles_block(["rlnImageName", "rlnDefocusU"], rows)
    with pytest.raises(InputError, match=r"column rlnDefocusU .* data row 3 has 'abc'"):
        read_star(write_star(tmp_path, block))


def test_nan_defocus_is_reported(tmp_path):
    block = particles_block(["rlnImageName", "rlnDefocusU"], ["1@a.mrcs 10000", "2@a.mrcs nan"])
    with pytest.raises(InputError, match=r"defocus_u_A must be a finite number, but data row 2"):
        read_star(write_star(tmp_path, block))


@pytest.mark.parametrize("optics,columns,rows,message", [
    ("1 0 2.7 0.1 1.5 64", [], [], r"rlnVoltage is 0 \(optics group 1, data row 1; 2 bad row\(s\) in all\): the voltage "
     r"must be at least 20 kV"),
    ("1 300000 2.7 0.1 1.5 64", [], [], r"rlnVoltage is 300000 .*did you give volts\?"),
    ("1 300 2.7 10 1.5 64", [], [], r"rlnAmplitudeContrast is 10 .*a fraction in \[0, 1\]; did you give a percentage"),
    ("1 300 2.7 -0.1 1.5 64", [], [], r"rlnAmplitudeContrast is -0.1 .*a fraction in \[0, 1\]"),
    ("1 300 2700 0.1 1.5 64", [], [], r"rlnSphericalAberration is 2700 .*in mm.*did you give micrometres"),
    (None, ["rlnDefocusU", "rlnDefocusV"], ["10000 10000", "-12000 -12000"],
     r"rlnDefocusU is -12000 \(optics group 1, data row 2; 1 bad row\(s\) in all\): defocus is positive for "
     r"underfocus"),
    (None, ["rlnDefocusU", "rlnDefocusV"], ["1.4 1.5", "1.6 1.6"],
     r"rlnDefocusU is 1.4 \(optics group 1, data row 1; 2 bad row\(s\) in all\): the defocus is in Angstrom.*"
     r"did you mean micrometres\?"),
    (None, ["rlnDefocusU", "rlnDefocusV"], ["12000 40", "12000 12000"], r"rlnDefocusV is 40 .*micrometres"),
    (None, ["rlnDefocusU", "rlnCtfScalefactor"], ["12000 1", "12000 0"], r"rlnCtfScalefactor is 0 .*must be > 0"),
])
def test_ctf_values_outside_physical_ranges_are_refused(tmp_path, optics, columns, rows, message):
    """Values that pass as numbers but cannot be right (issue 22): refused with the file, the label,
    the optics group and row, and the likely mistake."""
    rows = rows or ["12000", "12000"]
    columns = columns or ["rlnDefocusU"]
    block = particles_block(["rlnImageName", *columns], [f"{i + 1}@a.mrcs {r}" for i, r in enumerate(rows)])
    path = write_star(tmp_path, block, **({"optics_rows": optics} if optics else {}))
    with pytest.raises(InputError, match=rf"{path}: {message}"):
        read_star(path)


def test_near_focus_with_a_phase_plate_is_accepted(tmp_path):
    block = particles_block(["rlnImageName", "rlnDefocusU", "rlnPhaseShift"], ["1@a.mrcs 50 90", "2@a.mrcs -30 85"])
    t = read_star(write_star(tmp_path, block))
    assert t.particles.defocus_u_A.tolist() == [50.0, -30.0]


def test_assume_rules(tmp_path):
    block = particles_block(["rlnImageName", "rlnDefocusU"], ["1@a.mrcs 10000"])
    path = write_star(tmp_path, block, optics_rows="1 300 2.7 0.1 1.5 64")
    t = read_star(path, assume={"amplitude_contrast": 0.2, "defocus_angle_deg": 30})
    assert t.particles.amp_contrast[0] == 0.1  # the file's value wins
    assert t.particles.defocus_angle_deg[0] == 30
    assert any("ignored" in w and "rlnAmplitudeContrast" in w for w in t.warnings)
    assert any("defocus_angle_deg=30" in w for w in t.warnings)
    with pytest.raises(InputError, match="--assume bogus"):
        read_star(path, assume={"bogus": 1})


def test_empty_particle_loop(tmp_path):
    block = "\ndata_particles\n\nloop_\n_rlnImageName\n_rlnOpticsGroup\n_rlnDefocusU\n"
    t = read_star(write_star(tmp_path, block))
    assert_canonical(t)
    assert len(t) == 0 and t.has_ctf


def test_not_found_bad_extension_and_garbage(tmp_path):
    with pytest.raises(InputError, match="missing.star: file not found"):
        read_particles(tmp_path / "missing.star")
    other = tmp_path / "p.txt"
    other.write_text("x")
    with pytest.raises(InputError, match=r"p\.txt: unknown particle metadata format.*\.star.*\.cs"):
        read_particles(other)
    garbage = tmp_path / "g.star"
    garbage.write_bytes(b"\x00\x01 not a star file\n")
    with pytest.raises(InputError, match="g.star"):
        read_particles(garbage)


def test_subset(shared_data):
    t = load(shared_data, "cryodrgn/relion31.6opticsgroups.star")
    s = t.subset([5, 0, 5, 138])
    assert len(s) == 4 and s.particles.particle_id.tolist() == [5, 0, 5, 138]
    block = s.blocks["particles"]
    assert (block["rlnImageName"] == s.particles.image_name).all()
    assert s.blocks["optics"] is t.blocks["optics"] and len(t) == 139  # the original is unchanged
    pd.testing.assert_frame_equal(s.particles.iloc[[1]].reset_index(drop=True), t.particles.iloc[[0]])
    s.validate()


def test_a_repeated_label_is_named(tmp_path):
    """Found by tests/io/test_fuzz.py: a repeated label line gave an AttributeError from pandas."""
    star = tmp_path / "twice.star"
    star.write_text("data_particles\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n_rlnDefocusU #3\n"
                    "1@a.mrcs 10000 10000\n")
    with pytest.raises(InputError, match="label rlnDefocusU appears twice in data_particles"):
        read_particles(star, pixel_size=1.0)
