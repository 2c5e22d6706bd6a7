"""LightningModule training the learned moment reconstructor (models/reconstructor.py).

Loss per example: the O(3)-aligned relative volume error ``||a_hat - T(a)||^2 / ||a||^2``
(``T`` the best rotation/mirror of the truth onto the output, found without gradient) plus
``moment_weight`` times the invariant moment loss of the output. Validation logs the mean
aligned relative error and moment loss. The physics (moment model, basis, alignment) comes from
the datamodule (:class:`~cryo_lightning.data.moment_examples.MomentDataModule`).

The network is built from the datamodule's volume irreps in :meth:`configure_model`, which
records them in the hyperparameters, so ``load_from_checkpoint`` rebuilds it without a
datamodule; there its coefficient prior is fitted to the training molecules (a buffer, saved
with the weights).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics import MeanMetric

from cryo_lightning.models.reconstructor import MomentReconstructor

__all__ = ["ReconstructorTask"]


class ReconstructorTask(pl.LightningModule):
    """Train :class:`MomentReconstructor` on moment examples.

    Args:
        steps: unrolled steps ``K``.
        channels: hidden multiplicity per degree.
        lr: Adam learning rate.
        moment_weight: factor on the moment loss of the output.
        net_irreps, net_view_degree: the volume irreps and viewing degree of the network, set from
            the datamodule on first fit (leave unset in configs; named apart from the datamodule's
            hyperparameters, which Lightning merges with these).
    """

    def __init__(self, steps: int = 8, channels: int = 8, lr: float = 3e-3, moment_weight: float = 0.1,
                 net_irreps: str | None = None, net_view_degree: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: MomentReconstructor | None = None
        if net_irreps is not None and net_view_degree is not None:
            self._build(net_irreps, net_view_degree)
        self.val_error, self.val_moment = MeanMetric(), MeanMetric()

    def _build(self, volume_irreps: str, view_degree: int) -> None:
        self.net = MomentReconstructor(volume_irreps, view_degree, steps=self.hparams.steps,
                                       channels=self.hparams.channels).double()

    def configure_model(self) -> None:
        if self.net is None:
            dm = self.trainer.datamodule
            self.hparams.net_irreps, self.hparams.net_view_degree = dm.volume_irreps, dm.view_degree
            self._build(dm.volume_irreps, dm.view_degree)
            self.net.prior.fit(dm.train_coefficients())

    def forward(self, start: torch.Tensor, view_start: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
        """``(count,)``, ``(b_count,)`` start -> refined ``(a, b)`` for one example."""
        a, b = self.net(start[None], view_start[None], loss_fn)
        return a[0], b[0]

    def _losses(self, batch: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dm = self.trainer.datamodule
        errors, moments = [], []
        for ex in batch:
            loss_fn = dm.loss_fn(ex["moments"])
            a, b = self(ex["start"], ex["view_start"], loss_fn)
            truth = dm.align_reference(a, ex["coeffs"])
            errors.append((a - truth).pow(2).sum() / ex["coeffs"].pow(2).sum())
            moments.append(loss_fn(a, b))
        err, mom = torch.stack(errors), torch.stack(moments)
        return (err + self.hparams.moment_weight * mom).mean(), err.sqrt(), mom

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        loss, err, mom = self._losses(batch)
        self.log("train/loss", loss, batch_size=len(batch), prog_bar=True)
        self.log("train/aligned_rel_err", err.mean(), batch_size=len(batch))
        return loss

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        with torch.enable_grad():  # the unrolled steps need the moment-loss gradients
            _, err, mom = self._losses(batch)
        self.val_error.update(err.detach())
        self.val_moment.update(mom.detach())
        self.log("val/aligned_rel_err", self.val_error, batch_size=len(batch), prog_bar=True)
        self.log("val/moment_loss", self.val_moment, batch_size=len(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)
