"""ReconstructorTask (tasks/reconstructor.py): trains, logs, and reloads from a checkpoint without a datamodule."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from cryo_lightning.data.moment_examples import MomentDataModule
from cryo_lightning.tasks.checkpoints import alias_renamed_tasks
from cryo_lightning.tasks.reconstructor import ReconstructorTask


def test_fit_logs_metrics_and_checkpoint_rebuilds_the_network(tmp_path):
    pl.seed_everything(0)
    dm = MomentDataModule(box=16, l_max=2, view_degree=2, batch_size=2, n_train_molecules=4, n_val_molecules=2,
                          train_examples=4, val_examples=2)
    task = ReconstructorTask(steps=2, channels=4)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=dm)
    assert task.net is not None and task.hparams.net_irreps == dm.volume_irreps
    for key in ("train/loss", "val/aligned_rel_err", "val/moment_loss"):
        assert key in trainer.callback_metrics and torch.isfinite(trainer.callback_metrics[key])
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    loaded = ReconstructorTask.load_from_checkpoint(path)
    ex = dm.example("val", 0, 0)
    loss = dm.loss_fn(ex["moments"])
    a1, b1 = task(ex["start"], ex["view_start"], loss)
    a2, b2 = loaded(ex["start"], ex["view_start"], loss)
    torch.testing.assert_close(a1, a2, rtol=0, atol=1e-12)
    torch.testing.assert_close(b1, b2, rtol=0, atol=1e-12)


def test_a_checkpoint_of_the_old_task_name_loads(tmp_path):
    """LightningCLI checkpoints from before the rename name ``cryo_lightning.tasks.reconstruct.ReconstructTask``."""
    dm = MomentDataModule(box=16, l_max=2, view_degree=2)
    task = ReconstructorTask(steps=2, channels=4, net_irreps=dm.volume_irreps, net_view_degree=dm.view_degree)
    hparams = {**task.hparams, "_class_path": "cryo_lightning.tasks.reconstruct.ReconstructTask",
               "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": pl.__version__}, tmp_path / "old.ckpt")
    alias_renamed_tasks()
    loaded = ReconstructorTask.load_from_checkpoint(tmp_path / "old.ckpt")
    assert type(loaded) is ReconstructorTask and loaded.hparams.steps == 2
    weights = task.state_dict()
    assert all(torch.equal(value, weights[key]) for key, value in loaded.state_dict().items())
