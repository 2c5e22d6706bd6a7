"""`cryol reconstruct`: a simulated dataset gives the right map and poses; real stacks run end to end."""

from __future__ import annotations

import hashlib
import json

import mrcfile
import numpy as np
import pytest
import starfile

from cryo_lightning.cli import main


def _digest(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    main(["simulate", "--volume", "random", "--n-images", "120", "--box", "32", "--pixel-size", "6.0",
          "--snr", "1000", "--no-ctf", "--out", str(out), "--seed", "3"])
    return out


def test_common_lines_map_matches_the_truth(simulated, tmp_path):
    star = simulated / "particles.star"
    before = _digest([star, simulated / "particles.mrcs"])
    out = tmp_path / "rec" / "map.mrc"
    main(["reconstruct", "--star", str(star), "--out", str(out), "--box", "32", "--reference",
          str(simulated / "volume.mrc"), "--iterations", "15", "--device", "cpu"])
    assert _digest([star, simulated / "particles.mrcs"]) == before  # inputs untouched
    for suffix in (".mrc", ".star", "_fsc.png", "_fsc.json", "_half1.mrc", "_half2.mrc"):
        assert (tmp_path / "rec" / f"map{suffix}").is_file(), suffix
    report = json.loads((tmp_path / "rec" / "map_fsc.json").read_text())
    assert report["rotation_error_deg"] < 2.0, report["rotation_error_deg"]
    assert report["reference_resolution_A"] < 3 * 12.0  # FSC 0.5 beyond a third of Nyquist (12 A)
    with mrcfile.open(out) as m:
        assert m.data.shape == (32, 32, 32)
        assert float(m.voxel_size.x) == pytest.approx(6.0)
    written = starfile.read(tmp_path / "rec" / "map.star")["particles"]
    truth = starfile.read(star)["particles"]
    assert list(written["rlnImageName"]) == list(truth["rlnImageName"])
    assert {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"} <= set(written.columns)
    # Estimated angles differ from the input's (a different frame): they were really written.
    assert not np.allclose(written["rlnAngleTilt"], truth["rlnAngleTilt"])


def test_method_of_moments_writes_aligned_half_maps_and_report(simulated, tmp_path):
    star = simulated / "particles.star"
    before = _digest([star, simulated / "particles.mrcs"])
    out = tmp_path / "mom" / "map.mrc"
    main(["reconstruct", "--star", str(star), "--out", str(out), "--method", "moments", "--box", "16",
          "--l-max", "2", "--view-degree", "2", "--starts", "1", "--fit-iterations", "10", "20", "20", "--hops", "2",
          "--newton", "2", "--reference", str(simulated / "volume.mrc"), "--device", "cpu"])
    assert _digest([star, simulated / "particles.mrcs"]) == before
    for suffix in (".mrc", "_fsc.png", "_fsc.json", "_half1.mrc", "_half2.mrc"):
        assert (tmp_path / "mom" / f"map{suffix}").is_file(), suffix
    assert not (tmp_path / "mom" / "map.star").exists()  # no poses to write
    report = json.loads((tmp_path / "mom" / "map_fsc.json").read_text())
    assert report["method"] == "moments" and np.isfinite(report["moment_loss"])
    assert len(report["viewing_coefficients"]) == 6  # degree 2: b_00 and five b_2m
    assert 0 <= report["aligned_relative_error"] <= 1.0  # after the best scale factor
    assert len(report["fsc_half"]) == 9 and np.isfinite(report["fsc_half"]).all()
    with mrcfile.open(out) as m:
        assert m.data.shape == (16, 16, 16) and np.isfinite(m.data).all()
        assert float(m.voxel_size.x) == pytest.approx(12.0)
    with pytest.raises(SystemExit):
        main(["reconstruct", "--star", str(star), "--out", str(tmp_path / "c.mrc"), "--method", "moments",
              "--class-average"])


def test_refuses_existing_outputs_and_unknown_method(simulated, tmp_path, capsys):
    out = tmp_path / "map.mrc"
    out.write_bytes(b"x")
    with pytest.raises(SystemExit) as err:
        main(["reconstruct", "--star", str(simulated / "particles.star"), "--out", str(out)])
    assert err.value.code == 2 and "map.mrc" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reconstruct", "--star", str(simulated / "particles.star"), "--out", str(tmp_path / "b.mrc"),
              "--method", "magic"])
    assert "common-lines" in capsys.readouterr().err


def test_real_stack_with_class_averages_runs_end_to_end(shared_data, tmp_path):
    source = shared_data / "real" / "cryodrgn"
    star = source / "toy_projections_dir.star"
    before = _digest([star])
    out = tmp_path / "toy" / "map.mrc"
    main(["reconstruct", "--star", str(star), "--datadir", str(source / "toy_datadir"), "--pixel-size", "4.0",
          "--out", str(out), "--box", "30", "--max-images", "150", "--class-average", "--n-classes", "60",
          "--iterations", "5", "--device", "cpu"])
    assert _digest([star]) == before
    with mrcfile.open(out) as m:
        assert m.data.shape == (30, 30, 30) and np.isfinite(m.data).all()
    assert mrcfile.open(tmp_path / "toy" / "map_classes.mrcs").data.shape == (60, 30, 30)
    written = starfile.read(tmp_path / "toy" / "map.star")
    particles = written["particles"] if isinstance(written, dict) else written
    assert len(particles) == 60 and particles["rlnImageName"].str.contains("toy_images").all()


@pytest.fixture(scope="module")
def reconstructor_checkpoint(tmp_path_factory):
    """A ReconstructorTask checkpoint trained for two examples (box 16, l_max 2, no CTF) and its datamodule."""
    import lightning.pytorch as pl

    from cryo_lightning.data.moment_examples import MomentDataModule
    from cryo_lightning.tasks.reconstructor import ReconstructorTask

    tmp_path = tmp_path_factory.mktemp("reconstructor")
    pl.seed_everything(0)
    dm = MomentDataModule(box=16, l_max=2, bandlimit=0.3, view_degree=2, batch_size=2, n_train_molecules=8,
                          n_val_molecules=1, train_examples=2, val_examples=1, defocus_um=[])
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(ReconstructorTask(steps=2, channels=4), datamodule=dm)
    ckpt = tmp_path / "reconstructor.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, dm


def test_learned_fit_weighs_the_prior_by_the_sampling_error(reconstructor_checkpoint, monkeypatch):
    """Noisy moments: one MAP polish with weight strength * eps; exact moments: no prior, then the whitened endgame."""
    import torch

    from cryo_lightning.abinitio import moment_solver
    from cryo_lightning.abinitio.moment_loss import expected_misfit, moment_loss
    from cryo_lightning.data.moment_examples import MomentDataModule
    from cryo_lightning.tasks.learned_fit import LearnedFit

    ckpt, dm = reconstructor_checkpoint
    calls = []
    real = moment_solver.fit_moments

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append({**kwargs, "result": result})
        return result

    monkeypatch.setattr(moment_solver, "fit_moments", recording)
    fit = LearnedFit(str(ckpt), polish=30, prior_strength=0.5, hops=1, newton=2)
    noisy_dm = MomentDataModule(**{**dict(dm.hparams), "n_images": 2000, "snr": 0.5})
    noisy = noisy_dm.example("val", 0, 0)
    a, b, loss = fit.reconstruct(noisy_dm.moment_model, noisy["moments"], torch.Generator().manual_seed(0))
    eps = expected_misfit(noisy["moments"], use_m3=True)
    assert eps > 0 and calls[0]["prior_weight"] == pytest.approx(0.5 * eps)
    assert calls[0]["init"] is not None and not calls[0].get("whiten", False)
    polished = calls[0]["result"]
    first = float(moment_loss(noisy_dm.moment_model, polished.coeffs, polished.view_coeffs, noisy["moments"],
                              use_m3=True))
    assert len(calls) == (1 if first <= 2 * eps else 2)  # the endgame only if the polish left too much misfit
    misfit = float(moment_loss(noisy_dm.moment_model, a, b, noisy["moments"], use_m3=True))
    assert loss == pytest.approx(misfit + 0.5 * eps * float(fit.task.net.prior.energy(a)), rel=1e-9)
    calls.clear()
    exact = dm.example("val", 0, 0)
    fit.reconstruct(dm.moment_model, exact["moments"], torch.Generator().manual_seed(0))
    assert [c["prior_weight"] for c in calls] == [0.0, 0.0]
    assert calls[1]["whiten"] and calls[1]["hops"] == 1 and calls[1]["newton"] == 2


def test_learned_fit_loads_a_checkpoint_of_the_old_task_name(reconstructor_checkpoint, tmp_path):
    """Runs from before the rename recorded ``cryo_lightning.tasks.reconstruct.ReconstructTask`` (LightningCLI)."""
    import torch

    from cryo_lightning.tasks.checkpoints import current_task_name, task_name
    from cryo_lightning.tasks.learned_fit import LearnedFit
    from cryo_lightning.tasks.reconstructor import ReconstructorTask

    ckpt, _ = reconstructor_checkpoint
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"].update(_class_path="cryo_lightning.tasks.reconstruct.ReconstructTask",
                                          _instantiator="lightning.pytorch.cli.instantiate_module")
    torch.save(checkpoint, tmp_path / "old.ckpt")
    assert task_name(checkpoint) == "ReconstructTask" and current_task_name(checkpoint) == "ReconstructorTask"
    old, new = LearnedFit(str(tmp_path / "old.ckpt")), LearnedFit(str(ckpt))
    assert type(old.task) is ReconstructorTask
    weights = new.task.state_dict()
    assert old.task.state_dict().keys() == weights.keys()
    assert all(torch.equal(value, weights[key]) for key, value in old.task.state_dict().items())


def test_learned_method_loads_a_reconstructor_checkpoint(simulated, reconstructor_checkpoint, tmp_path, capsys):
    ckpt, _ = reconstructor_checkpoint
    star = simulated / "particles.star"
    out = tmp_path / "learned" / "map.mrc"
    main(["reconstruct", "--star", str(star), "--out", str(out), "--method", "learned", "--box", "16",
          "--checkpoint", str(ckpt), "--polish", "5", "--newton", "2", "--reference", str(simulated / "volume.mrc"), "--device", "cpu"])
    for suffix in (".mrc", "_fsc.png", "_fsc.json", "_half1.mrc", "_half2.mrc"):
        assert (tmp_path / "learned" / f"map{suffix}").is_file(), suffix
    report = json.loads((tmp_path / "learned" / "map_fsc.json").read_text())
    assert report["method"] == "learned" and np.isfinite(report["moment_loss"])
    assert len(report["viewing_coefficients"]) == 6 and 0 <= report["aligned_relative_error"] <= 1.0
    with mrcfile.open(out) as m:
        assert m.data.shape == (16, 16, 16) and np.isfinite(m.data).all()
    # the box must be the checkpoint's, and the checkpoint is required
    for extra, message in ((["--checkpoint", str(ckpt), "--box", "32"], "--box 16"), ([], "--checkpoint")):
        with pytest.raises(SystemExit):
            main(["reconstruct", "--star", str(star), "--out", str(tmp_path / f"x{len(extra)}.mrc"),
                  "--method", "learned", *extra])
        assert message in capsys.readouterr().err
