"""cryoSPARC .cs reading: every .cs fixture, the Rodrigues formula against scipy, synthetic edge cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryo_lightning.io.cryosparc import read_cryosparc
from cryo_lightning.io.errors import InputError
from cryo_lightning.io.particle_table import COLUMNS, ParticleTable
from cryo_lightning.io.particles import read_particles
from cryo_lightning.physics.rotations import matrix_to_euler, rotvec_to_matrix


def assert_canonical(table: ParticleTable) -> None:
    table.validate()  # columns, dtypes and values of the canonical table
    df = table.particles
    assert len(table.blocks["particles"]) == len(df)


def load(shared_data: Path, rel: str, **kwargs) -> tuple[ParticleTable, np.ndarray]:
    path = shared_data / "real" / rel
    table = read_particles(path, **kwargs)
    assert_canonical(table)
    assert table.format == "cryosparc" and table.particle_block == "particles"
    return table, np.load(path)


def test_rotvec_to_matrix_matches_scipy():
    rng = np.random.default_rng(0)
    axes = rng.normal(size=(200, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    edge = [0, 1e-9, 1e-5, 1e-4, 2e-4, np.pi, np.pi - 1e-7, 3, 5, 7]  # zero, Taylor switch, pi, > pi
    angles = np.concatenate([rng.uniform(0, np.pi, 190), edge])
    rotvecs = axes * angles[:, None]
    expected = Rotation.from_rotvec(rotvecs).as_matrix()
    got = rotvec_to_matrix(torch.from_numpy(rotvecs))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    got32 = rotvec_to_matrix(torch.from_numpy(rotvecs).float())
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), expected, atol=2e-6)
    np.testing.assert_array_equal(rotvec_to_matrix(torch.zeros(3)).numpy(), np.eye(3))


def test_p12_j24_3d_alignments(shared_data):
    t, raw = load(shared_data, "cryodrgn/cryosparc_P12_J24_001_particles.cs")
    p = t.particles
    assert len(t) == 2019 and t.has_ctf and t.pixel_size_source == "blob/psize_A"
    np.testing.assert_allclose(p.pixel_size_A, 2.95, rtol=1e-6)
    assert (p.box_px == 180).all() and (p.voltage_kV == 200).all() and (p.cs_mm == 2).all()
    np.testing.assert_allclose(p.amp_contrast, 0.07, rtol=1e-6)
    assert (p.data_sign == -1).all() and (p.optics_group == 1).all()
    assert p.stack_name.nunique() == 50 and p.stack_name.str.endswith(".mrc").all()
    assert p.image_name.iloc[1] == "000002@" + raw["blob/path"][1].decode()
    np.testing.assert_array_equal(p.stack_index, raw["blob/idx"])
    np.testing.assert_allclose(p.defocus_angle_deg, np.degrees(raw["ctf/df_angle_rad"].astype(np.float64)))
    # Poses: A_RELION = expmap(r)^T, checked with scipy for every particle (independently of our
    # matrix_to_euler) and through matrix_to_euler for the first one.
    pose = raw["alignments3D/pose"].astype(np.float64)
    expected = Rotation.from_rotvec(pose).as_matrix().transpose(0, 2, 1)
    angles = p[["rot_deg", "tilt_deg", "psi_deg"]].to_numpy()
    from_angles = Rotation.from_euler("ZYZ", angles, degrees=True).inv().as_matrix()
    np.testing.assert_allclose(from_angles, expected, atol=1e-9)
    first = matrix_to_euler(torch.from_numpy(expected[0])).numpy()
    np.testing.assert_allclose(angles[0], first, atol=1e-9)
    psize = raw["alignments3D/psize_A"].astype(np.float64)[:, None]
    shift = raw["alignments3D/shift"].astype(np.float64) * psize
    np.testing.assert_allclose(p[["shift_x_A", "shift_y_A"]].to_numpy(), shift)
    assert set(p.random_subset) == {1, 2} and (p.random_subset == raw["alignments3D/split"] + 1).all()
    assert (p.class_number == 1).all()
    # Original fields, vector fields flattened.
    block = t.blocks["particles"]
    assert block["uid"].dtype == np.uint64 and (block["uid"].to_numpy() == raw["uid"]).all()
    np.testing.assert_array_equal(block["alignments3D/pose_2"], raw["alignments3D/pose"][:, 2])


def test_j2_exported_2d_alignments(shared_data):
    t, raw = load(shared_data, "cryodrgn/cryosparc_J2_particles_exported.cs")
    p = t.particles
    assert len(t) == 22 and raw["blob/path"][0].startswith(b">")
    assert not p.stack_name.str.startswith(">").any() and not p.image_name.str.contains(">").any()
    assert p.stack_name.iloc[0] == "J1/imported/000090334788266266069_18jam15b_0345_ali_DW.mrcs"
    assert p.image_name.iloc[0] == "000001@J1/imported/000090334788266266069_18jam15b_0345_ali_DW.mrcs"
    np.testing.assert_allclose(p.pixel_size_A, 1.345, rtol=1e-6)
    assert (p.box_px == 300).all() and (p.voltage_kV == 300).all()
    np.testing.assert_allclose(p.psi_deg, np.degrees(raw["alignments2D/pose"].astype(np.float64)))
    assert p.rot_deg.isna().all() and p.tilt_deg.isna().all()
    np.testing.assert_array_equal(p.class_number, raw["alignments2D/class"].astype(np.int64) + 1)
    psize = raw["alignments2D/psize_A"].astype(np.float64)
    np.testing.assert_allclose(p.shift_y_A, raw["alignments2D/shift"][:, 1] * psize)


def test_empiar_10076_cs_matches_star(shared_data):
    cs, _ = load(shared_data, "cryodrgn/empiar_10076_7.cs")
    star = read_particles(shared_data / "real" / "cryodrgn" / "empiar_10076_7.star")
    a, b = cs.particles, star.particles
    assert len(cs) == 7
    cols = ["pixel_size_A", "voltage_kV", "cs_mm", "amp_contrast"]
    cols += ["defocus_u_A", "defocus_v_A", "defocus_angle_deg"]
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), atol=1e-3)
    assert (a.stack_name == b.stack_name).all() and (a.stack_index == b.stack_index).all()
    assert (a.phase_shift_deg == 0).all() and (a.ctf_scale == 1).all()
    assert (a.optics_group == 24).all()  # exp_group_id 23, 0-based
    assert (a.data_sign == -1).all() and (b.data_sign == 1).all()  # cryoSPARC keeps dark protein


def test_empty_4k_dataset(shared_data):
    t, raw = load(shared_data, "cryosparc-tools/4k_dataset.cs")
    assert len(t) == 0 and len(raw.dtype.names) == 106
    assert not t.has_ctf
    assert "alignments_class_2/pose_2" in t.blocks["particles"].columns
    assert t.subset([]).particles.shape == (0, len(COLUMNS))


# --- synthetic edge cases ---------------------------------------------------------------------


def save_cs(path: Path, fields: dict[str, np.ndarray]) -> Path:
    dtype = [(name, v.dtype, v.shape[1:]) for name, v in fields.items()]
    n = len(next(iter(fields.values())))
    data = np.zeros(n, dtype=dtype)
    for name, v in fields.items():
        data[name] = v
    with open(path, "wb") as f:  # np.save(path) would append ".npy"
        np.save(f, data)
    return path


def test_minimal_cs_defaults(tmp_path):
    path = save_cs(tmp_path / "m.cs", {
        "blob/path": np.array([b"a.mrc", b"a.mrc:mrcs"]),
        "blob/idx": np.array([4, 0], dtype=np.uint32),
        "blob/psize_A": np.array([1.5, 1.5], dtype=np.float32),
    })
    t = read_cryosparc(path)
    p = t.particles
    assert p.stack_name.tolist() == ["a.mrc", "a.mrc"] and p.stack_index.tolist() == [4, 0]
    assert p.image_name.iloc[0] == "000005@a.mrc"
    assert not t.has_ctf and p.defocus_u_A.isna().all()
    assert (p.data_sign == -1).all() and any("blob/sign" in w for w in t.warnings)
    assert (p.box_px == -1).all() and p.psi_deg.isna().all()
    t = read_cryosparc(path, pixel_size=2.0)
    assert (t.particles.pixel_size_A == 2).all() and t.pixel_size_source == "--pixel-size override"


def test_cs_errors(tmp_path):
    no_blob = save_cs(tmp_path / "passthrough.cs", {"uid": np.array([1, 2], dtype=np.uint64)})
    with pytest.raises(InputError, match="passthrough.cs: no blob/path"):
        read_cryosparc(no_blob)
    no_psize = save_cs(tmp_path / "nopsize.cs", {
        "blob/path": np.array([b"a.mrc"]), "blob/idx": np.array([0], dtype=np.uint32)
    })
    with pytest.raises(InputError, match="nopsize.cs: no blob/psize_A.*--pixel-size"):
        read_cryosparc(no_psize)
    partial_ctf = save_cs(tmp_path / "ctf.cs", {
        "blob/path": np.array([b"a.mrc"]),
        "blob/idx": np.array([0], dtype=np.uint32),
        "blob/psize_A": np.array([1.0], dtype=np.float32),
        "ctf/df1_A": np.array([1e4], dtype=np.float32),
    })
    with pytest.raises(InputError, match="ctf.cs: incomplete CTF.*ctf/accel_kv"):
        read_cryosparc(partial_ctf)
    garbage = tmp_path / "g.cs"
    garbage.write_bytes(b"not numpy")
    with pytest.raises(InputError, match="g.cs: cannot be read"):
        read_particles(garbage)
    with pytest.raises(InputError, match="--assume applies to STAR files only"):
        read_particles(partial_ctf, assume={"amplitude_contrast": 0.1})


def test_cs_ctf_values_outside_physical_ranges_are_refused(tmp_path):
    """The same range checks as for STAR files, with cryoSPARC's field names and row numbers."""
    fields = {"blob/path": np.array([b"a.mrc"] * 2), "blob/idx": np.array([0, 1], dtype=np.uint32),
              "blob/psize_A": np.array([1.0, 1.0], dtype=np.float32),
              "ctf/df1_A": np.array([1e4, 1.2], dtype=np.float32), "ctf/accel_kv": np.array([300, 300], np.float32),
              "ctf/cs_mm": np.array([2.7, 2.7], dtype=np.float32),
              "ctf/amp_contrast": np.array([0.1, 0.1], dtype=np.float32)}
    path = save_cs(tmp_path / "bad.cs", fields)
    with pytest.raises(InputError, match=r"bad.cs: ctf/df1_A is 1.2 \(data row 2; 1 bad row\(s\) in all\): .*micrometres"):
        read_cryosparc(path)
    fields["ctf/df1_A"][1] = 1.2e4
    fields["ctf/accel_kv"][:] = 3e5
    with pytest.raises(InputError, match=r"ctf/accel_kv is 300000 .*did you give volts"):
        read_cryosparc(save_cs(tmp_path / "volts.cs", fields))
