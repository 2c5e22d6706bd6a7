"""LightningModule training any denoiser on sets of images with clean targets."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from cryo_lightning.metrics import psnr, relative_mse

__all__ = ["DenoiseTask"]


class DenoiseTask(pl.LightningModule):
    """Supervised denoising: ``net(noisy) ~ clean`` (the clean CTF-affected projection).

    The network maps ``(B, N, L, L)`` noisy sets to denoised sets of the same shape (a
    single-image network simply treats the set axis as batch). The loss is the mean squared error
    in units of the noise variance; validation reports relative MSE and PSNR.

    Args:
        net: the denoiser (an ``nn.Module``; in YAML a ``class_path``/``init_args`` block).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(self, net: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.val_rel_mse, self.val_psnr = MeanMetric(), MeanMetric()
        self.val_rel_mse_noisy = MeanMetric()
        self.test_rel_mse, self.test_psnr = MeanMetric(), MeanMetric()

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        """``(B, N, L, L)`` -> ``(B, N, L, L)``."""
        return self.net(noisy)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        denoised = self(batch["noisy"])
        loss = nn.functional.mse_loss(denoised, batch["clean"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["noisy"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        denoised = self(batch["noisy"])
        self.val_rel_mse.update(relative_mse(denoised, batch["clean"]))
        self.val_rel_mse_noisy.update(relative_mse(batch["noisy"], batch["clean"]))
        self.val_psnr.update(psnr(denoised, batch["clean"]))
        self.log_dict({"val/rel_mse": self.val_rel_mse, "val/psnr": self.val_psnr,
                       "val/rel_mse_noisy": self.val_rel_mse_noisy}, prog_bar=True)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        denoised = self(batch["noisy"])
        self.test_rel_mse.update(relative_mse(denoised, batch["clean"]))
        self.test_psnr.update(psnr(denoised, batch["clean"]))
        self.log_dict({"test/rel_mse": self.test_rel_mse, "test/psnr": self.test_psnr})

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"denoised": self(batch["noisy"]), "seed": batch.get("seed")}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
