"""DenoiseTask: a short training run lowers the validation error, for a single-image and a set model."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from cryo_lightning.data.set_simulator import SimulationConfig
from cryo_lightning.data.synthetic import SyntheticSetDataModule
from cryo_lightning.models.dncnn import DnCNN
from cryo_lightning.models.set_transformer import PolarSetTransformer
from cryo_lightning.tasks.denoise import DenoiseTask


def _datamodule(set_size: int) -> SyntheticSetDataModule:
    sim = SimulationConfig(set_size=set_size, pixel_size=8.0, snr=(0.25, 0.25))
    return SyntheticSetDataModule(box=16, batch_size=2, simulation=sim, n_train_molecules=8, n_val_molecules=2,
                                  n_test_molecules=2, train_sets_per_epoch=200, val_sets=4, test_sets=4, seed=0)


def _val_rel_mse(task: DenoiseTask, dm: SyntheticSetDataModule) -> float:
    # inference_mode=False: metric states made here are updated again by the fit below
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         inference_mode=False,
                         enable_model_summary=False)
    return float(trainer.validate(task, datamodule=dm, verbose=False)[0]["val/rel_mse"])


@pytest.mark.parametrize("net,set_size,lr", [(DnCNN(depth=4, channels=16), 8, 3e-3),
                                             (PolarSetTransformer(L=16, n_radii=9, n_angles=32, heads=2, layers=1), 8, 5e-2)])
def test_short_training_lowers_validation_error(net, set_size, lr, tmp_path):
    torch.manual_seed(0)
    dm = _datamodule(set_size)
    task = DenoiseTask(net, lr=lr)
    before = _val_rel_mse(task, dm)
    trainer = pl.Trainer(accelerator="cpu", max_steps=25, logger=pl.loggers.TensorBoardLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=1, val_check_interval=25)
    trainer.fit(task, datamodule=dm)
    after = _val_rel_mse(task, dm)
    assert after < 0.9 * before, (before, after)
    assert list(tmp_path.rglob("events.out.tfevents*"))  # metrics and the image grid were logged


def test_fit_start_fits_a_population_prior(tmp_path):
    torch.manual_seed(0)
    net = PolarSetTransformer(L=16, n_radii=9, n_angles=32, heads=2, layers=1, guide="cwf", cwf_prior_strength=16,
                              cwf_prior_tempering=0.1, cwf_prior_molecules=8)
    task = DenoiseTask(net, lr=5e-2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, datamodule=_datamodule(8))
    assert not net.needs_population and float(net.cwf_prior.abs().sum()) > 0


def test_init_ckpt_starts_the_network_from_a_checkpoints_weights(tmp_path):
    torch.manual_seed(0)
    trained = DenoiseTask(DnCNN(depth=3, channels=4))
    path = tmp_path / "start.ckpt"
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": {}}, path)
    task = DenoiseTask(DnCNN(depth=3, channels=4), init_ckpt=str(path))
    assert not torch.equal(task.net.body[0].weight, trained.net.body[0].weight)
    task.configure_model()
    for a, b in zip(task.net.state_dict().values(), trained.net.state_dict().values()):
        assert torch.equal(a, b)
    # read once: a restored checkpoint overwrites the starting weights afterwards
    torch.nn.init.zeros_(task.net.body[0].weight)
    task.configure_model()
    assert not task.net.body[0].weight.any()
