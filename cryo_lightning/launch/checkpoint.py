"""The checkpoint a submitted job resumes from: ``last.ckpt``, every N steps and at the end."""

from __future__ import annotations

import os

import lightning.pytorch as pl

__all__ = ["ResumeCheckpoint", "RESUME_NAME"]

RESUME_NAME = "last.ckpt"


class ResumeCheckpoint(pl.Callback):
    """Writes the full training state to ``dirpath/last.ckpt`` every ``every_n_train_steps``
    optimizer steps (mid-epoch included) and when training ends.

    A requeued or resubmitted job restarts from this file at the step it was written, so at
    most ``every_n_train_steps`` steps are redone after a kill. The file is written under a
    temporary name and renamed, so a kill during the write leaves the previous one intact.
    Best-model checkpoints are a separate matter (a ``ModelCheckpoint`` in the config).

    Args:
        dirpath: the job's checkpoint folder.
        every_n_train_steps: optimizer steps between writes.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 500) -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1, got {every_n_train_steps}")
        self.dirpath, self.every_n_train_steps = str(dirpath), every_n_train_steps
        self._saved_step = -1

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, RESUME_NAME)

    def _save(self, trainer: pl.Trainer) -> None:
        partial = self.path + ".partial"
        trainer.save_checkpoint(partial)  # collective: every rank calls it, rank 0 writes
        if trainer.is_global_zero:
            os.replace(partial, self.path)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        step = trainer.global_step  # optimizer steps; unchanged by accumulating micro-batches
        if step > 0 and step % self.every_n_train_steps == 0 and step != self._saved_step:
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._saved_step:
            self._save(trainer)
