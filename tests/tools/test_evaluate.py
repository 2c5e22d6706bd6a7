"""`cryol evaluate`: half-map FSC, moment consistency and cross-validation FRC without ground truth."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from cryo_lightning.abinitio.evaluation import half_sets
from cryo_lightning.abinitio.evaluation import half_map_fsc
from cryo_lightning.cli import main
from cryo_lightning.io.mrc import read_stack, write_map, write_stack
from cryo_lightning.physics.fourier import fft3c, ifft3c, radial_grid
from cryo_lightning.physics.noise import disk_mask
from cryo_lightning.tools.evaluate import evaluate

L, PIXEL = 32, 6.0


def _digest(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """200 noisy CTF-affected images (SNR 1/8) with poses, their clean stack, and half the clean stack."""
    out = tmp_path_factory.mktemp("sim")
    main(["simulate", "--volume", "random", "--seed", "1", "--n-images", "200", "--box", str(L), "--pixel-size",
          str(PIXEL), "--snr", "0.125", "--out", str(out), "--device", "cpu"])
    write_stack(out / "half_clean.mrcs", 0.5 * read_stack(out / "particles_clean.mrcs"), PIXEL)
    return out


# -- half-map FSC ------------------------------------------------------------------------------


def _shells(n: int) -> torch.Tensor:
    return torch.round(radial_grid(n, 3)).long()


def test_fsc_of_identical_maps_is_one_and_of_independent_noise_maps_near_zero(tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, L, L, L, generator=g)
    write_map(tmp_path / "a.mrc", a, PIXEL)
    write_map(tmp_path / "b.mrc", b, PIXEL)
    same = half_map_fsc(str(tmp_path / "a.mrc"), str(tmp_path / "a.mrc"))
    assert np.allclose(same["fsc"], 1.0, atol=1e-6)
    assert same["resolution_A"]["0.143"] == pytest.approx(2 * PIXEL)  # never falls: Nyquist
    noise = np.asarray(half_map_fsc(str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"))["fsc"])
    # independent white noise: each shell's FSC has mean 0 and standard deviation 1/sqrt(N_k / 2)
    # (N_k voxels, half of them independent by Friedel symmetry); 5 sigma per shell
    counts = torch.bincount(_shells(L).flatten(), minlength=L // 2 + 1)[: L // 2 + 1].numpy()
    sigma = 1.0 / np.sqrt(counts / 2)
    assert (np.abs(noise[2:]) < 5 * sigma[2:]).all(), noise
    assert abs(noise[2:].mean()) < 5 * np.sqrt((sigma[2:] ** 2).sum()) / (len(noise) - 2)


def test_resolution_read_out_at_a_known_crossing(tmp_path):
    """Maps s + n and s - n, s only in shells <= 5 and n only beyond: FSC is exactly +1 then -1, so the
    interpolated crossing of t lies at shell 5 + (1 - t) / 2."""
    g = torch.Generator().manual_seed(1)
    spectrum = fft3c(torch.randn(L, L, L, generator=g, dtype=torch.float64))
    low = _shells(L) <= 5
    s, n = ifft3c(spectrum * low).real, ifft3c(spectrum * ~low).real
    write_map(tmp_path / "h1.mrc", s + n, 2.0)
    write_map(tmp_path / "h2.mrc", s - n, 2.0)
    write_map(tmp_path / "mask.mrc", torch.ones(L, L, L), 2.0)
    out = tmp_path / "eval"
    main(["evaluate", "--half-maps", str(tmp_path / "h1.mrc"), str(tmp_path / "h2.mrc"), "--mask",
          str(tmp_path / "mask.mrc"), "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())["half_maps"]
    fsc = np.asarray(metrics["fsc"])
    assert np.allclose(fsc[1:6], 1.0, atol=1e-5) and np.allclose(fsc[6:], -1.0, atol=1e-5)
    for t in (0.143, 0.5):
        assert metrics["resolution_A"][str(t)] == pytest.approx(L * 2.0 / (5 + (1 - t) / 2), rel=1e-4)
    assert (out / "fsc.png").stat().st_size > 0
    table = np.loadtxt(out / "fsc.csv", delimiter=",", skiprows=1)
    assert table.shape == (L // 2 + 1, 4) and np.allclose(table[:, 3], fsc, atol=1e-5)


def test_half_maps_bad_inputs_name_the_file(tmp_path, capsys):
    write_map(tmp_path / "a.mrc", torch.zeros(L, L, L), PIXEL)
    write_map(tmp_path / "small.mrc", torch.zeros(16, 16, 16), PIXEL)
    write_map(tmp_path / "mask.mrc", 3.0 * torch.ones(L, L, L), PIXEL)
    import mrcfile

    with mrcfile.new(tmp_path / "nan.mrc") as m:  # write_map refuses NaN
        m.set_data(np.full((L, L, L), np.nan, dtype=np.float32))
        m.voxel_size = PIXEL
    for extra, expected in ((["--half-maps", str(tmp_path / "a.mrc"), str(tmp_path / "small.mrc")], "small.mrc"),
                            (["--half-maps", str(tmp_path / "a.mrc"), str(tmp_path / "nan.mrc")],
                             f"nan.mrc: {L ** 3} NaN/Inf voxel(s): no FSC is computed from a non-finite map"),
                            (["--half-maps", str(tmp_path / "a.mrc"), str(tmp_path / "a.mrc"), "--mask",
                              str(tmp_path / "mask.mrc")], "[0, 1]"),
                            ([], "nothing to evaluate")):
        with pytest.raises(SystemExit) as err:
            main(["evaluate", *extra, "--out", str(tmp_path / "out")])
        assert err.value.code == 2 and expected in capsys.readouterr().err
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing published


# -- particles: moment consistency ---------------------------------------------------------------


def _moments(simulated, tmp_path, denoised: str, **kwargs) -> dict:
    metrics = evaluate(str(tmp_path), particles=str(simulated / "particles.star"),
                       denoised=str(simulated / denoised), frc=False, device="cpu", **kwargs)
    assert metrics["frc"] == {"skipped": "--no-frc"}
    return metrics["moments"]


def test_clean_images_are_consistent_within_sampling_error_and_shrinkage_is_not(simulated, tmp_path):
    clean = _moments(simulated, tmp_path / "clean", "particles_clean.mrcs", denoised_units="raw")
    assert clean["ctf_groups"] == 4 and sum(clean["group_counts"]) == 200
    # the difference is pure noise, which the raw estimate's sampling error bounds
    ratios = np.array([clean["m1_difference"] / clean["m1_error"],
                       clean["m2_total_difference"] / clean["m2_total_error"],
                       *np.divide(clean["m2_difference"], clean["m2_error"])])
    assert (ratios < 1.5).all(), ratios
    assert clean["m2_energy_ratio"][0] == pytest.approx(1.0, abs=0.15)
    assert clean["discrepancy"] < 1.5 * clean["expected_discrepancy"]

    half = _moments(simulated, tmp_path / "half", "half_clean.mrcs", denoised_units="raw")
    assert half["m2_difference"][0] > 3 * half["m2_error"][0]
    assert half["m2_total_difference"] > 3 * half["m2_total_error"]
    assert half["m2_energy_ratio"][0] == pytest.approx(0.25, abs=0.1)  # (1/2)^2 of the signal variance
    assert half["discrepancy"] > 5 * half["expected_discrepancy"]


def test_given_noise_variance_agrees_with_the_background_estimate(simulated, tmp_path):
    sigma2 = json.loads((simulated / "simulation.json").read_text())["noise_variance"]
    given = _moments(simulated, tmp_path / "given", "particles_clean.mrcs", denoised_units="raw",
                     noise_variance=sigma2)
    estimated = _moments(simulated, tmp_path / "estimated", "particles_clean.mrcs", denoised_units="raw")
    assert given["m2_difference"][0] == pytest.approx(estimated["m2_difference"][0], rel=0.1)
    assert given["m2_difference"][0] < 1.5 * given["m2_error"][0]


def test_large_boxes_are_worked_at_the_default_cap(simulated, tmp_path, capsys, monkeypatch):
    """Without --box, a stack larger than the cap is evaluated at the cap (the moment basis grows as
    L^4: box 320 particles would need tens of GB), with a note naming both boxes."""
    import cryo_lightning.tools.evaluate as module

    def box(folder, **kwargs) -> int:
        metrics = evaluate(str(tmp_path / folder), particles=str(simulated / "particles.star"),
                           denoised=str(simulated / "particles_clean.mrcs"), denoised_units="raw", frc=False,
                           device="cpu", **kwargs)
        return metrics["particles"]["box"]

    monkeypatch.setattr(module, "DEFAULT_MAX_BOX", 16)
    assert box("capped") == 16
    assert f"working at box 16 (the particles Fourier-downsampled from {L}); --box chooses another" in \
        capsys.readouterr().err
    assert box("given", box=24) == 24 and "working at box" not in capsys.readouterr().err


def test_normalised_denoised_units_match_raw_units_at_a_smaller_box(simulated, tmp_path):
    """Clean images written in the raw particles' background-normalised units (as cryol denoise writes
    them) give the same comparison as the clean stack in raw units, also after resampling to --box."""
    noisy, clean = read_stack(simulated / "particles.mrcs"), read_stack(simulated / "particles_clean.mrcs")
    background = ~disk_mask(L, 0.75 * L / 2)
    mean = noisy[:, background].mean(-1)[:, None, None]
    std = noisy[:, background].std(-1)[:, None, None]
    write_stack(tmp_path / "normalised.mrcs", (clean - mean) / std, PIXEL)
    for box in (None, 16):
        a = evaluate(str(tmp_path / f"raw{box}"), particles=str(simulated / "particles.star"),
                     denoised=str(simulated / "particles_clean.mrcs"), denoised_units="raw", box=box, frc=False,
                     device="cpu")["moments"]
        b = evaluate(str(tmp_path / f"norm{box}"), particles=str(simulated / "particles.star"),
                     denoised=str(tmp_path / "normalised.mrcs"), denoised_units="normalized", box=box, frc=False,
                     device="cpu")["moments"]
        assert np.allclose(a["m2_difference"], b["m2_difference"], rtol=1e-3)
        assert a["m1_difference"] == pytest.approx(b["m1_difference"], rel=1e-3)


# -- particles: cross-validation FRC and the command end to end --------------------------------


def test_cli_end_to_end_frc_favours_clean_images_and_leaves_inputs(simulated, tmp_path, capsys):
    inputs = [simulated / n for n in ("particles.star", "particles.mrcs", "particles_clean.mrcs", "volume.mrc")]
    before = _digest(inputs)
    out = tmp_path / "eval"
    args = ["evaluate", "--particles", str(inputs[0]), "--denoised", str(inputs[2]), "--denoised-units", "raw",
            "--half-maps", str(inputs[3]), str(inputs[3]), "--out", str(out), "--iterations", "10", "--k-max", "4",
            "--device", "cpu"]
    main(args)
    printed = capsys.readouterr().out
    assert _digest(inputs) == before
    for name in ("metrics.json", "fsc.png", "fsc.csv", "moments.png", "moments.csv", "frc.png", "frc.csv"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    frc = metrics["frc"]
    assert frc["half_sets"] == "rlnRandomSubset" and frc["n_images"] == 200
    assert frc["mean_denoised"] > frc["mean_raw"] + 0.1, (frc["mean_raw"], frc["mean_denoised"])
    low = slice(1, L // 4)  # below half Nyquist the clean images agree with the map far better
    assert (np.array(frc["denoised"][low]) > np.array(frc["raw"][low])).all()
    assert len(metrics["moments"]["m2_difference"]) == 5
    assert "Cross-validation FRC" in printed and "Moment consistency" in printed and "Half-map FSC" in printed
    # existing outputs are refused, and replaced with --overwrite
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2 and "metrics.json" in capsys.readouterr().err
    main([*args, "--overwrite", "--no-frc"])
    assert json.loads((out / "metrics.json").read_text())["frc"] == {"skipped": "--no-frc"}


def test_frc_is_skipped_without_poses_and_bad_pairs_are_refused(simulated, tmp_path, capsys):
    main(["evaluate", "--particles", str(simulated / "particles.mrcs"), "--denoised",
          str(simulated / "particles_clean.mrcs"), "--denoised-units", "raw", "--out", str(tmp_path / "a"),
          "--k-max", "2", "--device", "cpu"])
    assert "no poses" in capsys.readouterr().out
    assert not (tmp_path / "a" / "frc.png").exists()
    write_stack(tmp_path / "short.mrcs", torch.zeros(10, L, L), PIXEL)
    with pytest.raises(SystemExit) as err:
        main(["evaluate", "--particles", str(simulated / "particles.star"), "--denoised",
              str(tmp_path / "short.mrcs"), "--out", str(tmp_path / "b")])
    message = capsys.readouterr().err
    assert err.value.code == 2 and "short.mrcs" in message and "same particles" in message


def test_half_sets_use_random_subset_only_when_complete():
    rows = torch.arange(6)
    subsets, how = half_sets(torch.tensor([2, 1, 1, 2, 2, 1]), rows)
    assert how == "rlnRandomSubset" and subsets.tolist() == [2, 1, 1, 2, 2, 1]
    subsets, how = half_sets(torch.tensor([2, 0, 1, 2, 2, 1]), rows)
    assert how == "even/odd rows" and subsets.tolist() == [1, 2, 1, 2, 1, 2]


def test_real_ctf_particles_with_a_clean_stack(shared_data, tmp_path):
    """ASPIRE-written particles (RELION STAR with poses and CTF, opposite data sign) against their clean stack."""
    folder = shared_data / "aspire_sim"
    metrics = evaluate(str(tmp_path), particles=str(folder / "particles.star"),
                       denoised=str(folder / "clean_ctf.mrcs"), denoised_units="raw", box=16, k_max=4,
                       max_images=300, iterations=10, device="cpu")
    m = metrics["moments"]
    assert m["m2_total_difference"] < 1.5 * m["m2_total_error"]
    assert metrics["frc"]["half_sets"] == "even/odd rows"
    assert metrics["frc"]["mean_denoised"] > metrics["frc"]["mean_raw"]
