"""Writing STAR files for new stacks (round trips) and exporting subsets of the original file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile

from cryo_lightning.io.errors import InputError
from cryo_lightning.io.particles import read_particles
from cryo_lightning.io.particle_writer import export_subset, star_blocks_for_stack
from cryo_lightning.io.star import write_particles_star

# (fixture, read options): STAR layouts 3.0 / 3.1 / 5, several optics groups, and cryoSPARC.
CASES = [
    ("cryodrgn/relion31.star", {}),
    ("cryodrgn/relion31.v2.star", {}),
    ("cryodrgn/relion31.6opticsgroups.star", {}),
    ("cryodrgn/relion5.star", {}),
    ("cryodrgn/empiar_10076_7.star", {}),
    ("ASPIRE-Python/sample_particles_relion30.star", {}),
    ("ASPIRE-Python/sample_particles_relion31.star", {}),
    ("cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star", {"assume": {"amplitude_contrast": 0.1}}),
    ("relion/ap_s_c2d_red.star", {}),
    ("cryodrgn/cryosparc_P12_J24_001_particles.cs", {}),
    ("cryodrgn/empiar_10076_7.cs", {}),
]
_UNCHANGED = ["particle_id", "optics_group", "pixel_size_A", "voltage_kV", "cs_mm", "amp_contrast",
              "defocus_u_A", "defocus_v_A", "defocus_angle_deg", "phase_shift_deg", "ctf_bfactor_A2", "ctf_scale",
              "ctf_premultiplied", "rot_deg", "tilt_deg", "psi_deg", "shift_x_A", "shift_y_A",
              "random_subset", "class_number"]


@pytest.mark.parametrize("name,options", CASES, ids=[c[0].split("/")[-1] for c in CASES])
def test_round_trip_keeps_every_column_and_value(shared_data, tmp_path, name, options):
    table = read_particles(shared_data / "real" / name, **options)
    box = int(table.particles["box_px"].max()) if (table.particles["box_px"] > 0).any() else 64
    optics, particles = star_blocks_for_stack(table, "new/particles.mrcs", box, table.particles["pixel_size_A"].to_numpy())
    out = tmp_path / "out.star"
    write_particles_star(out, optics, particles)
    blocks = starfile.read(out, always_dict=True)
    assert list(blocks) == ["optics", "particles"]
    for column in ("rlnOpticsGroup", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"):
        assert column in blocks["optics"], column
    again = read_particles(out, assume=options.get("assume"))
    assert len(again) == len(table)
    assert again.particles["stack_name"].eq("new/particles.mrcs").all()
    np.testing.assert_array_equal(again.particles["stack_index"], np.arange(len(table)))
    for column in _UNCHANGED:
        if column == "particle_id":
            continue
        a, b = table.particles[column].to_numpy(), again.particles[column].to_numpy()
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6, equal_nan=True, err_msg=column)
        elif column != "optics_group" or "optics" in table.blocks:  # 3.0 and .cs inputs get new groups
            np.testing.assert_array_equal(b, a, err_msg=column)
    if table.format.startswith("relion"):  # every original particle column survives
        original = table.blocks[table.particle_block]
        written = blocks["particles"]
        for column in original.columns:
            assert column in written, column
            if column in ("rlnImageName",):
                continue
            if pd.api.types.is_numeric_dtype(original[column]):
                np.testing.assert_allclose(written[column].to_numpy(float), original[column].to_numpy(float),
                                           rtol=1e-6, atol=1e-6, err_msg=column)
            else:
                assert (written[column].astype(str).to_numpy() == original[column].astype(str).to_numpy()).all(), column


def test_downsampled_star_updates_pixel_units(shared_data):
    table = read_particles(shared_data / "real" / "ASPIRE-Python" / "sample_particles_relion30.star")
    new_pixel = table.particles["pixel_size_A"].to_numpy() * 2
    optics, particles = star_blocks_for_stack(table, "p.mrcs", 100, new_pixel)
    original = table.blocks[table.particle_block]
    np.testing.assert_allclose(particles["rlnOriginX"], original["rlnOriginX"] / 2)  # pixels halve
    np.testing.assert_allclose(particles["rlnOriginXAngst"], table.particles["shift_x_A"])  # Angstrom stay
    np.testing.assert_allclose(optics["rlnImagePixelSize"].to_numpy()[0], new_pixel[0], rtol=1e-6)
    assert (optics["rlnImageSize"] == 100).all()


def test_export_star_subset_keeps_only_used_optics_groups(shared_data, tmp_path):
    table = read_particles(shared_data / "real" / "cryodrgn" / "relion31.6opticsgroups.star")
    groups = table.particles["optics_group"].to_numpy()
    rows = np.flatnonzero(groups == groups[0])[:5][::-1]
    out = export_subset(table, rows, tmp_path / "subset.star")
    blocks = starfile.read(out, always_dict=True)
    assert len(blocks["optics"]) == 1 and len(blocks["particles"]) == 5
    original = table.blocks[table.particle_block]
    assert blocks["particles"]["rlnImageName"].tolist() == original["rlnImageName"].iloc[rows].tolist()


def test_export_cryosparc_subset(shared_data, tmp_path):
    source = shared_data / "real" / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs"
    table = read_particles(source)
    out = export_subset(table, np.array([10, 2, 7]), tmp_path / "subset.cs")
    np.testing.assert_array_equal(np.load(out), np.load(source)[[10, 2, 7]])


def test_export_refuses_the_input_and_bad_rows(shared_data, tmp_path):
    source = shared_data / "real" / "cryodrgn" / "relion31.star"
    table = read_particles(source)
    with pytest.raises(InputError, match="input"):
        export_subset(table, np.array([0]), source, overwrite=True)
    with pytest.raises(InputError, match="rows"):
        export_subset(table, np.array([5]), tmp_path / "x.star")
