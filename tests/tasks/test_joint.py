"""JointTask (tasks/joint.py): stages, gradients end to end, checkpoints, and the end-of-fit report."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import mrcfile
import pytest
import torch

from cryo_lightning.data.joint_examples import JointDataModule
from cryo_lightning.io.errors import InputError
from cryo_lightning.models.dncnn import DnCNN
from cryo_lightning.physics.noise import disk_mask
from cryo_lightning.tasks.checkpoints import DENOISER_PREFIXES, RECONSTRUCTOR_PREFIXES, load_task_weights
from cryo_lightning.tasks.joint import JointTask
from cryo_lightning.tasks.joint_report import JointReport


def _dm() -> JointDataModule:
    return JointDataModule(box=16, l_max=2, view_degree=2, n_images=64, set_size=16, snr=0.25, batch_size=1,
                           n_train_molecules=4, n_val_molecules=1, n_test_molecules=1, train_examples=6,
                           val_examples=1)


def _trainer(tmp_path, steps: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks),
                      limit_val_batches=1, enable_checkpointing=False)


def test_staged_fit_runs_every_stage_writes_the_report_and_reloads(tmp_path):
    pl.seed_everything(0)
    dm = _dm()
    task = JointTask(DnCNN(depth=3, channels=8), steps=2, channels=4, denoiser_steps=2, reconstructor_steps=2)
    trainer = _trainer(tmp_path, 6, [JointReport(molecules=1, polish=3, gallery_images=4)])
    trainer.fit(task, datamodule=dm)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/volume", "train/consistency", "val/volume_err", "val/volume_err_raw",
                "val/image_rel_mse", "val/noisy_rel_mse"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert float(metrics["train/stage"]) == 2.0  # the last steps were joint
    report = json.loads((tmp_path / "metrics.json").read_text())
    row = report["molecules"][0]
    # unit noise over the signal power, which the SNR defines inside the disk (the box mean is lower)
    disk = float(disk_mask(16).sum())
    assert row["noisy_rel_mse"] == pytest.approx(16 * 16 / (0.25 * disk), rel=0.1)
    for name in ("map.mrc", "map_truth.mrc", "map_raw.mrc", "fsc.png", "gallery.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    with mrcfile.open(tmp_path / "map.mrc") as m:
        assert m.data.shape == (16, 16, 16) and float(m.voxel_size.x) == pytest.approx(3.0)
    # the checkpoint rebuilds the reconstructor from its hyperparameters (no datamodule needed)
    path = tmp_path / "joint.ckpt"
    trainer.save_checkpoint(path)
    loaded = JointTask.load_from_checkpoint(path, weights_only=False)  # hparams hold the DnCNN built here
    assert loaded.hparams.net_irreps == dm.volume_irreps
    for k, v in task.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_volume_loss_reaches_the_denoiser_only_in_the_joint_stage(tmp_path):
    dm = _dm()
    task = JointTask(DnCNN(depth=3, channels=8), steps=2, channels=4, image_weight=0.0, consistency_weight=0.0)
    trainer = _trainer(tmp_path, 1)
    trainer.fit(task, datamodule=dm)  # builds the reconstructor
    batch = [dm.example("train", 0, 0)]
    grads = {}
    for stage in ("reconstructor", "joint"):
        task.zero_grad(set_to_none=True)
        losses = task._losses(batch, stage)
        task._total({k: v for k, v in losses.items() if k in ("volume", "moment")}).backward()
        grads[stage] = sum(float(p.grad.abs().sum()) for p in task.denoiser.parameters() if p.grad is not None)
    assert grads["reconstructor"] == 0.0
    assert grads["joint"] > 0.0


def test_reconstructor_output_is_differentiable_in_the_target_moments_only_when_asked():
    dm = _dm()
    task = JointTask(DnCNN(depth=3, channels=8), steps=2, channels=4)
    task._build(dm.volume_irreps, dm.view_degree)
    ex = dm.example("val", 0, 0)
    images = ex["clean"].double().requires_grad_(True)
    moments = dm.image_moments(images, ex["groups"])
    a0, b0 = ex["start"][None], ex["view_start"][None]
    a1, _ = task.reconstructor(a0, b0, dm.loss_fn(moments), through_target=True)
    a2, _ = task.reconstructor(a0, b0, dm.loss_fn(moments), through_target=False)
    torch.testing.assert_close(a1, a2, rtol=1e-12, atol=1e-12)  # same forward values
    assert not a2.requires_grad or torch.autograd.grad(a2.sum(), images, allow_unused=True)[0] is None
    (g,) = torch.autograd.grad(a1.square().sum(), images)
    assert float(g.abs().sum()) > 0


def test_pretrained_checkpoints_load_and_mismatches_are_refused(tmp_path):
    # a JointTask keeps its networks under denoiser.* and reconstructor.*; both load into a new run
    dm = _dm()
    task = JointTask(DnCNN(depth=3, channels=8), steps=2, channels=4)
    task._build(dm.volume_irreps, dm.view_degree)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": {"net_irreps": dm.volume_irreps,
                                                                      "net_view_degree": dm.view_degree}},
               tmp_path / "joint.ckpt")
    fresh = JointTask(DnCNN(depth=3, channels=8), steps=2, channels=4)
    fresh._build(dm.volume_irreps, dm.view_degree)
    load_task_weights(fresh.denoiser, tmp_path / "joint.ckpt", DENOISER_PREFIXES, "denoiser_ckpt")
    load_task_weights(fresh.reconstructor, tmp_path / "joint.ckpt", RECONSTRUCTOR_PREFIXES, "reconstructor_ckpt")
    for k, v in task.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(InputError, match="no such file"):
        load_task_weights(DnCNN(depth=3, channels=8), tmp_path / "none.ckpt", DENOISER_PREFIXES, "denoiser_ckpt")
    with pytest.raises(InputError, match="does not fit"):
        load_task_weights(DnCNN(depth=4, channels=8), tmp_path / "joint.ckpt", DENOISER_PREFIXES, "denoiser_ckpt")


def test_configure_model_starts_from_a_reconstruct_task_checkpoint_and_checks_its_setting(tmp_path):
    from cryo_lightning.tasks.reconstructor import ReconstructorTask

    dm = _dm()
    pretrained = ReconstructorTask(steps=2, channels=4, net_irreps=dm.volume_irreps, net_view_degree=dm.view_degree)
    torch.save({"state_dict": pretrained.state_dict(), "hyper_parameters": dict(pretrained.hparams)},
               tmp_path / "reconstructor.ckpt")
    task = JointTask(DnCNN(depth=3, channels=8), steps=2, channels=4,
                     reconstructor_ckpt=str(tmp_path / "reconstructor.ckpt"))
    _trainer(tmp_path, 0).fit(task, datamodule=dm)  # configure_model runs, no step
    for k, v in pretrained.net.state_dict().items():
        torch.testing.assert_close(task.reconstructor.state_dict()[k], v, rtol=0, atol=0)
    other = JointDataModule(box=16, l_max=2, view_degree=4, n_images=64, set_size=16, batch_size=1,
                            n_train_molecules=2, n_val_molecules=1, train_examples=1, val_examples=1)
    task = JointTask(DnCNN(depth=3, channels=8), steps=2, channels=4,
                     reconstructor_ckpt=str(tmp_path / "reconstructor.ckpt"))
    with pytest.raises(InputError):
        _trainer(tmp_path, 0).fit(task, datamodule=other)
