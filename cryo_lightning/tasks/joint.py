"""LightningModule training a denoiser and the learned moment reconstructor end to end.

One example is ``n_images`` noisy projections of one molecule under an unknown non-uniform
viewing distribution (:class:`~cryo_lightning.data.joint_examples.JointDataModule`)::

    noisy sets --denoiser--> denoised images --moments--> M1, M2, M3 slice
               --MomentReconstructor (K unrolled steps on the moment loss)--> SFB volume a

Losses (weights in brackets, each a relative error so that they share one scale):

- ``image`` [``image_weight``]: ``||denoised - clean||^2 / ||clean||^2`` (synthetic data only);
- ``volume`` [``volume_weight``]: the O(3)-aligned relative volume error of
  :class:`~cryo_lightning.tasks.reconstructor.ReconstructorTask`;
- ``moment`` [``moment_weight``]: the invariant moment loss of the output volume against the
  denoised images' moments, held fixed (it trains the reconstructor: letting it move the
  denoised moments towards the output would reward the denoiser for agreeing with a wrong map);
- ``consistency`` [``consistency_weight``]: :func:`~cryo_lightning.abinitio.image_moments.moment_discrepancy`
  of ``M1`` and ``M2`` between the denoised images and the noise-debiased raw images: a denoiser
  may lower the variance of the moments but not shift them (needs no clean image). The ``M3``
  slice is left out: from a few hundred images at low SNR its debiased estimate is mostly
  sampling error, a target that only adds gradient noise.

Staged unfreezing by global step: the first ``denoiser_steps`` train the denoiser alone (image
and consistency losses; the reconstructor is not run), the next ``reconstructor_steps`` train
the reconstructor alone on the (fixed) denoiser's moments, and then both train together with
every loss, the volume loss reaching the denoiser through the moments (the reconstructor's loss
gradients are kept differentiable in the target moments). With pretrained checkpoints
(``denoiser_ckpt`` from a :class:`~cryo_lightning.tasks.denoise.DenoiseTask` run,
``reconstructor_ckpt`` from a ``ReconstructorTask`` run) both stages can be 0.

Validation logs the image relative MSE (and that of the noisy input), the aligned volume error
of the pipeline, and, as the reference, the volume error of the same reconstructor fed the
debiased moments of the raw images. The physics (moments, moment loss, alignment) comes from the
datamodule.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from cryo_lightning.abinitio.image_moments import ImageMoments, moment_discrepancy
from cryo_lightning.abinitio.moment_solver import power_matched_start
from cryo_lightning.io.errors import InputError
from cryo_lightning.models.reconstructor import MomentReconstructor
from cryo_lightning.tasks.checkpoints import DENOISER_PREFIXES, RECONSTRUCTOR_PREFIXES, load_task_weights
from cryo_lightning.tasks.image_grid import image_grid
from cryo_lightning.tasks.optim import lr_groups

__all__ = ["JointTask"]


class JointTask(pl.LightningModule):
    """Denoiser + learned moment reconstructor, trained end to end (module docstring).

    Args:
        denoiser: any denoiser of ``(B, N, L, L)`` sets (``class_path``/``init_args`` in YAML);
            ``ctf`` and ``noise_variance`` are passed to networks whose ``forward`` takes them.
        steps, channels: the reconstructor's unrolled steps and hidden multiplicity.
        lr: Adam learning rate of the denoiser.
        lr_overrides: rates for denoiser parameters by name prefix, e.g. ``{"refiner": 0.001}``
            (as :class:`~cryo_lightning.tasks.denoise.DenoiseTask`'s, relative to the denoiser).
        reconstructor_lr: Adam learning rate of the reconstructor.
        image_weight, volume_weight, moment_weight, consistency_weight: loss weights.
        denoiser_steps, reconstructor_steps: lengths of the two warm-up stages (global steps).
        denoiser_ckpt, reconstructor_ckpt: pretrained task checkpoints to start from.
        grid_images: images in the TensorBoard grid.
        joint_lr_scale: factor on the denoiser's learning rate in the joint stage (the volume
            loss reaches it through the moments of a still imperfect reconstructor; a smaller
            step keeps it from undoing what the image loss taught it).
        net_irreps, net_view_degree: the reconstructor's volume irreps and viewing degree, set
            from the datamodule on first fit (leave unset in configs).

    Attributes:
        physics: the :class:`~cryo_lightning.data.joint_examples.JointDataModule` that supplies
            the moments, the moment loss and the alignment; the trainer's datamodule during
            fit/validate (set it by hand to use a loaded checkpoint outside a trainer).
    """

    def __init__(self, denoiser: nn.Module, steps: int = 8, channels: int = 8, lr: float = 1e-3,
                 reconstructor_lr: float = 3e-3, image_weight: float = 1.0, volume_weight: float = 1.0,
                 moment_weight: float = 0.1, consistency_weight: float = 0.1, denoiser_steps: int = 0,
                 reconstructor_steps: int = 0, denoiser_ckpt: str | None = None,
                 reconstructor_ckpt: str | None = None, grid_images: int = 4, joint_lr_scale: float = 1.0,
                 lr_overrides: dict[str, float] | None = None, net_irreps: str | None = None,
                 net_view_degree: int | None = None) -> None:
        super().__init__()
        with warnings.catch_warnings():
            # the saved `denoiser` is its class_path/init_args config under LightningCLI
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters()
        self.denoiser = denoiser
        self._extra_inputs = [k for k in ("ctf", "noise_variance") if k in inspect.signature(denoiser.forward).parameters]
        self.reconstructor: MomentReconstructor | None = None
        self.physics = None  # the JointDataModule whose moment model and alignment the losses use
        if net_irreps is not None and net_view_degree is not None:
            self._build(net_irreps, net_view_degree)
        names = ("image_rel_mse", "noisy_rel_mse", "volume_err", "volume_err_raw", "consistency")
        self.val_metrics = nn.ModuleDict({k: MeanMetric() for k in names})

    def _build(self, volume_irreps: str, view_degree: int) -> None:
        self.reconstructor = MomentReconstructor(volume_irreps, view_degree, steps=self.hparams.steps,
                                                 channels=self.hparams.channels).double()

    def configure_model(self) -> None:
        if getattr(self, "_trainer", None) is not None:  # load_from_checkpoint calls this without one
            self.physics = self.trainer.datamodule
        if self.reconstructor is not None:
            return
        dm = self.physics
        self.hparams.net_irreps, self.hparams.net_view_degree = dm.volume_irreps, dm.view_degree
        self._build(dm.volume_irreps, dm.view_degree)
        if self.hparams.reconstructor_ckpt:
            hp = load_task_weights(self.reconstructor, self.hparams.reconstructor_ckpt, RECONSTRUCTOR_PREFIXES,
                                   "reconstructor_ckpt")
            if (hp.get("net_irreps"), hp.get("net_view_degree")) != (dm.volume_irreps, dm.view_degree):
                raise InputError(f"reconstructor checkpoint {self.hparams.reconstructor_ckpt} was trained for "
                                 f"irreps {hp.get('net_irreps')} and viewing degree {hp.get('net_view_degree')}, "
                                 f"the data give {dm.volume_irreps} and {dm.view_degree}; match box, l_max, "
                                 "bandlimit and view_degree")
        else:
            self.reconstructor.prior.fit(dm.train_coefficients())
        if self.hparams.denoiser_ckpt:
            load_task_weights(self.denoiser, self.hparams.denoiser_ckpt, DENOISER_PREFIXES, "denoiser_ckpt")

    def _reconstructor_to_cpu(self) -> None:
        # The moment model, the examples and the loss gradients live on the CPU (float64); the
        # trainer moves the whole module to its device, so the reconstructor comes back here.
        # Parameters keep their identity under .to(), so the optimiser still holds them.
        if self.reconstructor is not None:
            self.reconstructor.to("cpu")

    def on_validation_start(self) -> None:
        self._reconstructor_to_cpu()

    def on_fit_start(self) -> None:
        self._reconstructor_to_cpu()
        if getattr(self.denoiser, "needs_population", False):  # a set model's population prior
            self.denoiser.fit_population(self.physics.train_targets(
                self.denoiser.cwf_prior_molecules, device=self.device))

    # ----------------------------------------------------------------------------- pipeline
    def denoise(self, batch: list[dict[str, Any]]) -> torch.Tensor:
        """Denoise every example's sets: ``(sum of sets, N, L, L)`` on the model's device."""
        noisy = torch.cat([ex["noisy"] for ex in batch]).to(self.device)
        given = {"ctf": lambda: torch.cat([ex["ctf"] for ex in batch]).to(self.device),
                 "noise_variance": lambda: noisy.new_ones(noisy.shape[0])}  # unit noise by construction
        return self.denoiser(noisy, **{k: given[k]() for k in self._extra_inputs})

    def reconstruct(self, moments: ImageMoments, start: torch.Tensor, view_start: torch.Tensor,
                    through_target: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Volume and viewing coefficients from moments, from a start power-matched to them."""
        dm = self.physics
        with torch.no_grad():
            a0 = power_matched_start(dm.moment_model, moments.detach(), start, view_start)
        with torch.enable_grad():  # the unrolled steps need the moment-loss gradients
            a, b = self.reconstructor(a0[None], view_start[None], dm.loss_fn(moments), through_target=through_target)
        return a[0], b[0]

    def _volume_error(self, a: torch.Tensor, truth: torch.Tensor, n_refine: int = 4) -> torch.Tensor:
        aligned = self.physics.align_reference(a, truth, n_refine=n_refine)
        return (a - aligned).pow(2).sum() / truth.pow(2).sum()

    def _stage(self) -> str:
        step, hp = self.global_step, self.hparams
        if step < hp.denoiser_steps:
            return "denoiser"
        if step < hp.denoiser_steps + hp.reconstructor_steps:
            return "reconstructor"
        return "joint"

    def _losses(self, batch: list[dict[str, Any]], stage: str) -> dict[str, torch.Tensor]:
        dm = self.physics
        with torch.set_grad_enabled(torch.is_grad_enabled() and stage != "reconstructor"):
            denoised = self.denoise(batch)
        clean = torch.cat([ex["clean"] for ex in batch]).to(denoised.device)
        out = {"image": (denoised - clean).square().sum() / clean.square().sum()}
        consistency, volume, moment = [], [], []
        first = 0
        for ex in batch:
            count = ex["noisy"].shape[0]
            mine = denoised[first:first + count].to(torch.float64).cpu()  # the moment model lives on the CPU
            first += count
            moments = dm.image_moments(mine, ex["groups"])
            consistency.append(moment_discrepancy(moments, ex["moments"]))
            if stage != "denoiser":
                a, b = self.reconstruct(moments, ex["start"], ex["view_start"], through_target=stage == "joint")
                volume.append(self._volume_error(a, ex["coeffs"], n_refine=1))  # fast; validation refines 4
                # against fixed targets: moving the denoised moments towards the output is a shortcut
                moment.append(dm.loss_fn(moments.detach())(a, b))
        out["consistency"] = torch.stack(consistency).mean()
        if volume:
            out["volume"], out["moment"] = torch.stack(volume).mean(), torch.stack(moment).mean()
        return out

    def _total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        hp = self.hparams
        weights = {"image": hp.image_weight, "consistency": hp.consistency_weight,
                   "volume": hp.volume_weight, "moment": hp.moment_weight}
        # image loss on the model's device, the moment-side losses on the CPU: summed on the former
        return sum(weights[k] * v.to(device=self.device, dtype=torch.float32) for k, v in losses.items())

    # ----------------------------------------------------------------------------- loops
    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        stage = self._stage()
        losses = self._losses(batch, stage)
        if stage == "reconstructor":  # the denoiser is fixed in this stage
            losses = {k: v for k, v in losses.items() if k in ("volume", "moment")}
        loss = self._total(losses)
        self.log("train/loss", loss.float(), prog_bar=True, batch_size=len(batch))
        self.log_dict({f"train/{k}": v.float() for k, v in losses.items()}, batch_size=len(batch))
        self.log("train/stage", float(("denoiser", "reconstructor", "joint").index(stage)), batch_size=len(batch))
        return loss

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("JointTask validation needs gradients of the moment loss (the reconstructor's "
                               "unrolled steps): set trainer.inference_mode: false (as configs/quickstart.yaml does)")
        dm = self.physics
        denoised = self.denoise(batch)
        clean = torch.cat([ex["clean"] for ex in batch]).to(denoised.device)
        noisy = torch.cat([ex["noisy"] for ex in batch]).to(denoised.device)
        m = self.val_metrics
        m["image_rel_mse"].update(((denoised - clean).square().sum() / clean.square().sum()).float())
        m["noisy_rel_mse"].update(((noisy - clean).square().sum() / clean.square().sum()).float())
        first = 0
        for ex in batch:
            count = ex["noisy"].shape[0]
            moments = dm.image_moments(denoised[first:first + count].to(torch.float64).cpu(), ex["groups"])
            first += count
            m["consistency"].update(moment_discrepancy(moments, ex["moments"]).float())
            a, _ = self.reconstruct(moments, ex["start"], ex["view_start"])
            m["volume_err"].update(self._volume_error(a, ex["coeffs"]).sqrt().float())
            a_raw, _ = self.reconstruct(ex["moments"], ex["start"], ex["view_start"])
            m["volume_err_raw"].update(self._volume_error(a_raw, ex["coeffs"]).sqrt().float())
        for k, v in m.items():
            self.log(f"val/{k}", v, batch_size=len(batch), prog_bar=k == "volume_err")
        if batch_idx == 0:
            self._log_grid(noisy, denoised, clean)

    def _log_grid(self, noisy: torch.Tensor, denoised: torch.Tensor, clean: torch.Tensor) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        grid = image_grid([noisy, denoised, clean], self.hparams.grid_images)
        experiment.add_image("val/noisy_denoised_clean", grid[None].float().cpu(), self.global_step)

    def configure_optimizers(self) -> dict[str, Any]:
        denoiser = lr_groups(self.denoiser.named_parameters(), self.hparams.lr, self.hparams.lr_overrides)
        optimizer = torch.optim.Adam([*denoiser, {"params": list(self.reconstructor.parameters()),
                                                  "lr": self.hparams.reconstructor_lr}])
        start = self.hparams.denoiser_steps + self.hparams.reconstructor_steps
        scale = self.hparams.joint_lr_scale
        factors = [lambda step: scale if step >= start else 1.0] * len(denoiser) + [lambda step: 1.0]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

