"""A curriculum over set sizes: training starts on small sets and ends on large ones."""

from __future__ import annotations

from dataclasses import replace

import lightning.pytorch as pl

__all__ = ["SetSizeCurriculum"]


class SetSizeCurriculum(pl.Callback):
    """Change the training simulator's set sizes at given steps.

    Small sets are cheap and teach the per-image part quickly; large sets (up to 512) are what
    the attention must learn to exploit. Each stage replaces the training ``set_size`` list of a
    :class:`~cryo_lightning.data.synthetic.SyntheticSetDataModule`; validation keeps its own.

    Args:
        stages: ``[[first_step, [sizes...]], ...]`` in increasing ``first_step``; the first stage
            must start at step 0.
    """

    def __init__(self, stages: list[tuple[int, list[int]]]) -> None:
        if not stages or stages[0][0] != 0:
            raise ValueError(f"stages must start at step 0, got {stages}")
        steps = [int(step) for step, _ in stages]
        if steps != sorted(steps) or any(min(sizes) < 1 for _, sizes in stages):
            raise ValueError(f"stages need increasing steps and set sizes >= 1, got {stages}")
        self.stages = [(int(step), [int(n) for n in sizes]) for step, sizes in stages]

    def sizes_at(self, step: int) -> list[int]:
        """The set sizes of the stage that holds ``step``."""
        return next(sizes for first, sizes in reversed(self.stages) if step >= first)

    def _apply(self, trainer: pl.Trainer) -> None:
        simulators = getattr(trainer.datamodule, "simulators", None)
        if not simulators or "train" not in simulators:
            raise ValueError("SetSizeCurriculum needs a SyntheticSetDataModule (its 'train' simulator)")
        simulator = simulators["train"]
        sizes = self.sizes_at(trainer.global_step)
        if simulator.config.set_size != sizes:  # a copy: the splits share one config object
            simulator.config = replace(simulator.config, set_size=sizes)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer)  # also right after a resume

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        self._apply(trainer)
