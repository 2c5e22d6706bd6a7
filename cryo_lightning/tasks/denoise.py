"""LightningModule training any denoiser (single-image or set) on images with clean targets."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from cryo_lightning.metrics import frc_curve, psnr, relative_mse
from cryo_lightning.tasks.checkpoints import DENOISER_PREFIXES, load_task_weights
from cryo_lightning.tasks.image_grid import image_grid
from cryo_lightning.tasks.model_registry import resolve_checkpoint
from cryo_lightning.tasks.optim import lr_groups

__all__ = ["DenoiseTask"]


class DenoiseTask(pl.LightningModule):
    """Supervised denoising: ``net(noisy) ~ clean`` (the clean CTF-affected projection).

    The network maps ``(B, N, L, L)`` noisy sets to denoised sets of the same shape (a
    single-image network treats the set axis as batch). Networks whose ``forward`` takes ``ctf``
    and ``noise_variance`` receive them from the batch. The loss is the mean squared error in
    units of the noise variance; validation and test report relative MSE, PSNR and the mean FRC,
    and validation logs an image grid (noisy | denoised | clean) to TensorBoard.

    Args:
        net: the denoiser (an ``nn.Module``; in YAML a ``class_path``/``init_args`` block).
        lr: Adam learning rate.
        lr_overrides: learning rates for parameters whose name starts with a prefix, e.g.
            ``{"net.refiner": 0.001}`` (a convolutional part of a model whose other parameters
            are a handful of physical quantities that want a larger step).
        weight_decay: Adam weight decay.
        grid_images: images shown in the validation grid.
        init_ckpt: a ``cryol fit`` checkpoint (DenoiseTask or JointTask) or a shipped model's name
            (``cryol models``) whose denoiser weights ``net`` starts from (e.g. a Wiener-guided model fine-tuned with a CWF guide: same
            network, another guide); None: ``net``'s own initialisation. Read when a trainer first
            uses the task; a resumed run's checkpoint overwrites it.
    """

    def __init__(self, net: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0, grid_images: int = 4,
                 lr_overrides: dict[str, float] | None = None, init_ckpt: str | None = None) -> None:
        super().__init__()
        with warnings.catch_warnings():
            # Under LightningCLI the saved `net` is its class_path/init_args config, which is what
            # lets load_from_checkpoint rebuild the network; Lightning's advice to ignore it
            # applies to modules built in code.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters()
        self.net = net
        params = inspect.signature(net.forward).parameters
        self._extra_inputs = [k for k in ("ctf", "noise_variance", "guide") if k in params]
        self.val_rel_mse, self.val_psnr, self.val_rel_mse_noisy = MeanMetric(), MeanMetric(), MeanMetric()
        self.test_rel_mse, self.test_psnr, self.test_rel_mse_noisy = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_frc, self.test_frc = MeanMetric(), MeanMetric()

    def forward(self, noisy: torch.Tensor, ctf: torch.Tensor | None = None,
                noise_variance: torch.Tensor | None = None, guide: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N, L, L)`` -> ``(B, N, L, L)``; ``ctf`` ``(B, N, L, L)``, ``noise_variance``
        ``(B,)`` and a precomputed ``guide`` ``(B, N, L, L)`` (cached EM estimates) are passed on to
        networks that take them."""
        given = {"ctf": ctf, "noise_variance": noise_variance, "guide": guide}
        return self.net(noisy, **{k: given[k] for k in self._extra_inputs})

    def _denoise(self, batch: dict[str, Any]) -> torch.Tensor:
        extra = {"guide": batch["guide"]} if "guide" in batch else {}  # cached guides (cryol cache-guides)
        return self(batch["noisy"], batch.get("ctf"), batch.get("noise_variance"), **extra)

    def configure_model(self) -> None:
        init = self.hparams.get("init_ckpt")
        if init is not None and not getattr(self, "_initialised", False):
            load_task_weights(self.net, resolve_checkpoint(init), DENOISER_PREFIXES, "init_ckpt")
        self._initialised = True

    def on_fit_start(self) -> None:
        # A set model with a population prior (PolarSetTransformer's CWF guide) fits it once to the
        # clean targets of the first training epoch; resumed runs restore it from the checkpoint.
        if getattr(self.net, "needs_population", False):
            dm = self.trainer.datamodule
            if not hasattr(dm, "train_targets"):
                raise ValueError(f"{type(self.net).__name__} has a population prior to fit, which needs synthetic "
                                 f"training molecules (SyntheticSetDataModule); {type(dm).__name__} has none. "
                                 "Start from a checkpoint trained on synthetic data, or set cwf_prior_strength: 0.")
            self.net.fit_population(dm.train_targets(self.net.cwf_prior_molecules, device=self.device))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        denoised = self._denoise(batch)
        loss = nn.functional.mse_loss(denoised, batch["clean"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["noisy"].shape[0])
        return loss

    def _evaluate(self, batch: dict[str, Any], prefix: str) -> torch.Tensor:
        denoised = self._denoise(batch)
        clean = batch["clean"]
        metrics = {"rel_mse": self.val_rel_mse, "psnr": self.val_psnr, "rel_mse_noisy": self.val_rel_mse_noisy,
                   "frc": self.val_frc} if prefix == "val" else \
                  {"rel_mse": self.test_rel_mse, "psnr": self.test_psnr, "rel_mse_noisy": self.test_rel_mse_noisy,
                   "frc": self.test_frc}
        metrics["rel_mse"].update(relative_mse(denoised, clean))
        metrics["rel_mse_noisy"].update(relative_mse(batch["noisy"], clean))
        metrics["psnr"].update(psnr(denoised, clean))
        metrics["frc"].update(frc_curve(denoised, clean).mean(-1))
        self.log_dict({f"{prefix}/{k}": v for k, v in metrics.items()}, prog_bar=prefix == "val")
        return denoised

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        denoised = self._evaluate(batch, "val")
        if batch_idx == 0:
            self._log_grid([batch["noisy"], denoised, batch["clean"]], "val/noisy_denoised_clean")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"denoised": self._denoise(batch), "particle_id": batch.get("particle_id", batch.get("seed"))}

    def _log_grid(self, images: list[torch.Tensor], tag: str) -> None:
        """Log the first ``grid_images`` images of each ``(..., L, L)`` tensor as one row of the
        TensorBoard image ``tag`` (e.g. noisy | denoised | clean)."""
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        grid = image_grid(images, self.hparams.grid_images)
        experiment.add_image(tag, grid[None].float().cpu(), self.global_step)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = lr_groups(self.named_parameters(), self.hparams.lr, self.hparams.get("lr_overrides"))
        return torch.optim.Adam(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
