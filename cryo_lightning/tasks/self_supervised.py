"""LightningModule fine-tuning any denoiser (single-image or set) on images without clean targets.

Two objectives, both for white Gaussian noise of known variance ``sigma^2`` per set (what
background normalisation, plus whitening for coloured noise, gives particle images):

- **Noisier2Noise** (Moran et al., CVPR 2020). Add more noise, ``z = y + m`` with
  ``m ~ N(0, alpha^2 sigma^2)`` white, and regress on the observed ``y``. Since
  ``E[y | z] = (alpha^2 E[x | z] + z) / (1 + alpha^2)``, the paper trains ``f(z) ~ y`` and takes
  ``x_hat = ((1 + alpha^2) f(z) - z) / alpha^2``. Here the network *is* that corrected estimate,
  ``h = x_hat``: the loss ``|| (alpha^2 h(z) + z) / (1 + alpha^2) - y ||^2`` is, up to the factor
  ``(alpha^2 / (1 + alpha^2))^2``, ``|| h(z) - t ||^2`` with the target ``t = y - m / alpha^2``.
  So ``h`` is a clean-image estimator like any :class:`~cryo_lightning.tasks.denoise.DenoiseTask`
  network (a supervised checkpoint is a good start), and for *every* ``h``
  ``E || h(z) - t ||^2 = E || h(z) - x ||^2 + (1 + 1 / alpha^2) sigma^2`` per pixel: the loss
  minus that floor is an unbiased estimate of the true MSE, logged as ``mse_estimate``.
- **SURE** (Stein's unbiased risk estimate): ``|| h(y) - y ||^2 / P - sigma^2 + 2 sigma^2 div h(y) / P``
  over the ``P`` pixels of a set has the expectation ``|| h(y) - x ||^2 / P``; the divergence is a
  Monte Carlo finite difference ``b . (h(y + eps b) - h(y)) / eps``, ``b ~ N(0, 1)`` (one extra
  forward pass). Trains at the data's own noise level, but needs ``sigma^2`` exactly right.

Inference (``forward``, so also validation, ``predict_step`` and ``cryol denoise``): SURE's
network is applied to ``y`` itself. Noisier2Noise's network ``h`` was trained on the noisier
``z``, so its output is averaged over ``inference_samples`` noisier copies ``z_k = y + m_k``
(fixed seeds, so the output is reproducible): each ``h(z_k)`` is the estimator the training made,
on the input it was made for, and the average removes part of the added noise. Applying ``h`` to
``y`` directly (``inference_samples: 0``) feeds it less noise than it was trained on (and, for
networks with batch normalisation, statistics of ``z`` that ``y`` does not have), which was clearly
worse on the demo stack of docs/cli/finetune.md.
Networks that take ``noise_variance`` get the variance of their actual input,
``(1 + alpha^2) sigma^2`` for ``z``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cryo_lightning.physics.noise import estimate_noise_variance
from cryo_lightning.tasks.checkpoints import DENOISER_PREFIXES, load_task_weights
from cryo_lightning.tasks.denoise import DenoiseTask
from cryo_lightning.tasks.model_registry import resolve_checkpoint

__all__ = ["OBJECTIVES", "noisier2noise_pair", "noisier2noise_floor", "sure_loss", "load_denoiser_weights",
           "SelfSupervisedDenoiseTask"]

OBJECTIVES = ("noisier2noise", "sure")


def _per_set(x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` variances -> ``(B, 1, 1, 1)``, to broadcast over ``(B, N, L, L)`` sets."""
    return x.reshape(-1, 1, 1, 1)


def noisier2noise_pair(noisy: torch.Tensor, noise_variance: torch.Tensor, alpha: float,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisier input ``z = y + m`` and the target ``t = y - m / alpha^2`` of one Noisier2Noise step.

    ``m`` is white Gaussian noise of variance ``alpha^2 sigma^2`` (``sigma^2`` per set); then
    ``E[t | z] = E[x | z]``, so regressing ``h(z)`` on ``t`` trains a clean-image estimator.

    Args:
        noisy: ``(B, N, L, L)`` observed images ``y`` (clean ``x`` plus white noise of variance ``sigma^2``).
        noise_variance: ``(B,)`` ``sigma^2`` per set, in the images' units squared.
        alpha: standard deviation of the added noise relative to the data's (> 0).
        generator: seeds ``m`` (on ``noisy``'s device).
    Returns:
        ``(z, t)``, both ``(B, N, L, L)``.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    m = torch.randn(noisy.shape, generator=generator, device=noisy.device, dtype=noisy.dtype)
    m = m * (alpha * _per_set(noise_variance).to(noisy.dtype).sqrt())
    return noisy + m, noisy - m / alpha**2


def noisier2noise_floor(alpha: float) -> float:
    """Expected Noisier2Noise loss of a perfect denoiser, per pixel in units of ``sigma^2``:
    ``1 + 1 / alpha^2`` (the variance of ``t - x = n - m / alpha^2``)."""
    return 1.0 + 1.0 / alpha**2


def sure_loss(denoise: Callable[[torch.Tensor], torch.Tensor], noisy: torch.Tensor, noise_variance: torch.Tensor,
              epsilon: float = 1e-3, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stein's unbiased estimate of the per-pixel MSE of ``denoise(noisy)``, per set.

    Args:
        denoise: maps ``(B, N, L, L)`` -> ``(B, N, L, L)`` (the network with its other inputs bound).
        noisy: ``(B, N, L, L)`` images ``y = x + n``, ``n`` white Gaussian of variance ``sigma^2``.
        noise_variance: ``(B,)`` ``sigma^2`` per set.
        epsilon: finite-difference step of the divergence, in units of ``sigma``.
        generator: seeds the probe ``b``.
    Returns:
        ``(risk, denoised)``: ``(B,)`` estimates of ``||denoise(y) - x||^2 / (P sigma^2)`` (``P`` pixels
        per set; unbiased up to the finite-difference and Monte Carlo error of the divergence),
        and the ``(B, N, L, L)`` output on ``y``.
    """
    var = _per_set(noise_variance).to(noisy.dtype)
    denoised = denoise(noisy)
    probe = torch.randn(noisy.shape, generator=generator, device=noisy.device, dtype=noisy.dtype)
    step = epsilon * var.sqrt()
    divergence = (probe * (denoise(noisy + step * probe) - denoised) / step).flatten(1).sum(1)  # (B,)
    pixels = noisy[0].numel()
    residual = ((denoised - noisy).square() / var).flatten(1).sum(1)
    return (residual + 2 * divergence) / pixels - 1.0, denoised


# Where task checkpoints keep their denoiser: DenoiseTask's ``net``, JointTask's ``denoiser``.
def load_denoiser_weights(net: nn.Module, path: str | Path) -> None:
    """Load the denoiser of a ``DenoiseTask`` (``net.*``) or ``JointTask`` (``denoiser.*``)
    checkpoint, or of a shipped model (``pretrained:NAME``, or ``NAME`` when no such file exists;
    ``cryol models`` lists them), into ``net`` (weights and buffers, e.g. a fitted population
    prior); see :func:`~cryo_lightning.tasks.checkpoints.load_task_weights`."""
    load_task_weights(net, resolve_checkpoint(path), DENOISER_PREFIXES, "init_ckpt")


class SelfSupervisedDenoiseTask(DenoiseTask):
    """Denoiser training without clean images: Noisier2Noise or SURE (see the module docstring).

    The network maps ``(B, N, L, L)`` noisy sets to estimates of the clean sets, as in
    :class:`~cryo_lightning.tasks.denoise.DenoiseTask`, whose optimiser, prediction and
    population-prior check this task inherits. The noise variance per set is the batch's
    ``noise_variance`` (synthetic data), else the variance of the pixels outside the disk of radius
    ``noise_radius * L / 2`` (the corners: pure noise for a centred particle), averaged over the
    set. Logged: ``train/loss`` and ``val/ss_loss`` (the objective, per pixel in units of the noise
    variance; validation draws its noise from fixed seeds, so values are comparable between
    epochs) and ``val/mse_estimate`` (the objective's unbiased estimate of the network's MSE on its
    training input, same units: lower is better); with clean images in the batch (synthetic data)
    also ``val/rel_mse``, ``val/rel_mse_noisy``, ``val/psnr`` and ``val/frc`` of the inference
    output, and an image grid.

    Args:
        net: the denoiser (an ``nn.Module``; in YAML a ``class_path``/``init_args`` block).
        objective: ``"noisier2noise"`` or ``"sure"``.
        alpha: Noisier2Noise's added-noise standard deviation relative to the data's.
        init_ckpt: a ``DenoiseTask`` (or ``JointTask``) checkpoint, or a shipped model
            (``pretrained:NAME`` or ``NAME``), whose denoiser weights and buffers (e.g. a fitted
            population prior) ``net`` starts from; None: ``net``'s own initialisation. Read
            once, when a trainer first uses the task (:meth:`configure_model`);
            ``load_from_checkpoint`` reads it too unless given ``init_ckpt=None`` (the
            fine-tuned weights replace it anyway).
        lr, weight_decay, grid_images, lr_overrides: as for ``DenoiseTask``.
        inference_samples: Noisier2Noise inference averages the network over this many noisier
            copies of the input; 0: the network on the input itself.
        sure_epsilon: SURE's finite-difference step, in units of the noise standard deviation.
        noise_radius: the background for the noise variance starts at ``noise_radius * L / 2``
            from the centre.
    """

    def __init__(self, net: nn.Module, objective: str = "noisier2noise", alpha: float = 1.0,
                 init_ckpt: str | None = None, lr: float = 1e-4, weight_decay: float = 0.0, grid_images: int = 4,
                 lr_overrides: dict[str, float] | None = None, inference_samples: int = 16,
                 sure_epsilon: float = 1e-3, noise_radius: float = 1.0) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if alpha <= 0 or sure_epsilon <= 0 or inference_samples < 0 or not 0 < noise_radius <= 1.4:
            raise ValueError(f"need alpha > 0, sure_epsilon > 0, inference_samples >= 0 and noise_radius in "
                             f"(0, 1.4] (got {alpha}, {sure_epsilon}, {inference_samples}, {noise_radius})")
        super().__init__(net, lr=lr, weight_decay=weight_decay, grid_images=grid_images, lr_overrides=lr_overrides)
        self._started = False

    def configure_model(self) -> None:
        # The starting weights are loaded when a trainer first uses the task rather than in
        # __init__: a bad init_ckpt then stops `cryol fit` with one clear message (not inside
        # the config parser's error), and a restored checkpoint overwrites them afterwards.
        if self.hparams.init_ckpt is not None and not self._started:
            load_denoiser_weights(self.net, self.hparams.init_ckpt)
        self._started = True

    def noise_variance(self, noisy: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` noise variance of each ``(B, N, L, L)`` set: ``given``, else estimated from the
        background."""
        if given is not None:
            return given.to(noisy.dtype)
        return estimate_noise_variance(noisy, self.hparams.noise_radius * noisy.shape[-1] / 2).flatten(1).mean(1)

    def network(self, noisy: torch.Tensor, ctf: torch.Tensor | None, noise_variance: torch.Tensor) -> torch.Tensor:
        """The network itself on ``(B, N, L, L)`` input whose noise variance is ``(B,)``."""
        return DenoiseTask.forward(self, noisy, ctf, noise_variance)

    def forward(self, noisy: torch.Tensor, ctf: torch.Tensor | None = None,
                noise_variance: torch.Tensor | None = None) -> torch.Tensor:
        """Inference (see the module docstring): ``(B, N, L, L)`` -> ``(B, N, L, L)``; ``ctf``
        ``(B, N, L, L)`` and ``noise_variance`` ``(B,)`` (None: estimated from the background)."""
        var = self.noise_variance(noisy, noise_variance)
        samples = self.hparams.inference_samples
        if self.hparams.objective == "sure" or samples == 0:
            return self.network(noisy, ctf, var)
        alpha = self.hparams.alpha
        generator = torch.Generator(device=noisy.device).manual_seed(0)
        total = torch.zeros_like(noisy)
        for _ in range(samples):
            noisier, _ = noisier2noise_pair(noisy, var, alpha, generator)
            total = total + self.network(noisier, ctf, (1 + alpha**2) * var)
        return total / samples

    def self_supervised_loss(self, batch: dict[str, Any],
                             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective per set ``(B,)`` (per pixel, units of the noise variance) and its
        unbiased estimate of the network's MSE ``(B,)`` (same units)."""
        noisy, ctf = batch["noisy"], batch.get("ctf")
        var = self.noise_variance(noisy, batch.get("noise_variance"))
        if self.hparams.objective == "sure":
            risk, _ = sure_loss(lambda y: self.network(y, ctf, var), noisy, var, self.hparams.sure_epsilon, generator)
            return risk, risk
        alpha = self.hparams.alpha
        noisier, target = noisier2noise_pair(noisy, var, alpha, generator)
        estimate = self.network(noisier, ctf, (1 + alpha**2) * var)
        loss = ((estimate - target).square() / _per_set(var)).flatten(1).mean(1)
        return loss, loss - noisier2noise_floor(alpha)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.self_supervised_loss(batch)[0].mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["noisy"].shape[0])
        return loss

    def _evaluate_self_supervised(self, batch: dict[str, Any], prefix: str, batch_idx: int) -> torch.Tensor:
        """Log the objective (and the supervised metrics when the batch has clean images); returns
        the inference output."""
        # Fixed noise per batch: the loss then changes only when the network does.
        generator = torch.Generator(device=batch["noisy"].device).manual_seed(2 * batch_idx + (prefix == "test"))
        loss, mse = self.self_supervised_loss(batch, generator)
        size = batch["noisy"].shape[0]
        self.log(f"{prefix}/ss_loss", loss.mean(), batch_size=size, sync_dist=True, prog_bar=prefix == "val")
        self.log(f"{prefix}/mse_estimate", mse.mean(), batch_size=size, sync_dist=True)
        if "clean" in batch:  # synthetic data: the truth says whether fine-tuning helps
            return self._evaluate(batch, prefix)
        return self._denoise(batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        denoised = self._evaluate_self_supervised(batch, "val", batch_idx)
        if batch_idx == 0:
            if "clean" in batch:
                self._log_grid([batch["noisy"], denoised, batch["clean"]], "val/noisy_denoised_clean")
            else:
                self._log_grid([batch["noisy"], denoised], "val/noisy_denoised")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_self_supervised(batch, "test", batch_idx)
