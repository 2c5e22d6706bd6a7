"""SetSizeCurriculum: the training sets grow at the given steps; validation keeps its sizes."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from cryo_lightning.data.set_simulator import SimulationConfig
from cryo_lightning.data.synthetic import SyntheticSetDataModule
from cryo_lightning.models.rotational_transformer import RotationalSetTransformer
from cryo_lightning.tasks.curriculum import SetSizeCurriculum
from cryo_lightning.tasks.denoise import DenoiseTask


class _SeenSizes(pl.Callback):
    def __init__(self) -> None:
        self.train: list[int] = []
        self.val: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.train.append(int(batch["noisy"].shape[1]))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val.append(int(batch["noisy"].shape[1]))


def test_training_set_sizes_follow_the_stages_and_validation_does_not(tmp_path):
    torch.manual_seed(0)
    sim = SimulationConfig(set_size=[6], pixel_size=8.0, snr=(0.25, 0.25))
    dm = SyntheticSetDataModule(box=16, batch_size=1, simulation=sim, n_train_molecules=4, n_val_molecules=2,
                                n_test_molecules=2, train_sets_per_epoch=100, val_sets=2, test_sets=2, seed=0)
    net = RotationalSetTransformer(L=16, channels=4, heads=1, head_dim=4, layers=1, classes=2, hidden=4)
    seen = _SeenSizes()
    trainer = pl.Trainer(accelerator="cpu", max_steps=7, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         val_check_interval=7, callbacks=[SetSizeCurriculum([[0, [2]], [3, [3]], [5, [4]]]), seen])
    trainer.fit(DenoiseTask(net, lr=1e-3), datamodule=dm)
    # steps 0-2 at size 2, steps 3-4 at 3, steps 5-6 at 4
    assert seen.train == [2, 2, 2, 3, 3, 4, 4]
    assert seen.val and set(seen.val) == {6}


def test_stages_must_start_at_zero_and_increase():
    with pytest.raises(ValueError, match="step 0"):
        SetSizeCurriculum([[5, [8]]])
    with pytest.raises(ValueError, match="increasing"):
        SetSizeCurriculum([[0, [8]], [10, [16]], [5, [32]]])
