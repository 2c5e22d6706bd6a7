"""A U-Net that refines a classical, CTF-aware estimate of its set: a learned prior on top of the
radial Wiener filter or the covariance Wiener filter (CWF)."""

from __future__ import annotations

import torch
from torch import nn

from cryo_lightning.denoise.cwf import cwf_denoise
from cryo_lightning.denoise.sure import apply_ring_weights, sure_ring_weights
from cryo_lightning.denoise.wiener import wiener_denoise
from cryo_lightning.models.unet import UNet

__all__ = ["GUIDES", "GuidedUNet"]

GUIDES = ("wiener", "cwf")
# Pixels per U-Net pass in evaluation (64 images of 64 x 64).
_EVAL_PIXELS = 64 * 64 * 64


class GuidedUNet(nn.Module):
    """``guide + UNet([noisy, guide])``: a U-Net that starts from a classical estimate fitted to
    its set.

    ``guide="wiener"``: :func:`cryo_lightning.denoise.wiener.wiener_denoise`, the set's radial
    signal spectrum (least squares over its images, CTF-aware) and each image's own CTF give the
    MMSE linear estimate of the clean CTF-affected image. It carries what a blind network cannot
    see at SNR 1/30 (where the CTF zeros lie, how much signal each frequency has for *this*
    molecule at *this* pixel size). Images are denoised one by one; the set only enters through
    the shared radial spectrum, so this is in effect a single-image network (sets of one image
    work, with a noisier spectrum).

    ``guide="cwf"``: :func:`cryo_lightning.denoise.cwf.cwf_denoise`, the covariance Wiener filter:
    the set's mean and covariance in a steerable basis (learned from the set itself, CTF-aware),
    the best linear estimate from the set; it improves with the set size (use sets of hundreds of
    images at inference). The network adds the nonlinear part of the prior on top.

    The U-Net's last layer starts at zero, so an untrained model is its guide. Both channels are
    in units of the noise standard deviation. Any box size works.

    Args:
        depth: U-Net down-sampling steps.
        channels: U-Net features at full resolution.
        guide: ``"wiener"`` or ``"cwf"``.
        train_images: in training, refine only the first this many images of each set (the
            guide still uses the whole set; the other images get the guide, which carries no
            gradient): large sets for a good guide at the cost of a small batch. None: all.
        quarter_turns: in evaluation, average the U-Net's correction over the four quarter turns
            of its input (the data are uniform over in-plane angles, so this only removes the
            network's orientation bias; 4x the U-Net's cost). Training is unaffected.
        sure_blend: in evaluation, weight the correction per frequency ring by the SURE-optimal
            weight in [0, 1] of :mod:`cryo_lightning.denoise.sure`, estimated from each set itself
            (no ground truth): the output moves towards the guide in the bands where the learned
            prior does not fit the data. Costs a second guide fit and the U-Net on
            ``sure_probes`` more images. Training is unaffected. Reliable for sets of hundreds of
            images; with a few dozen the weights are noisy.
        sure_probes: images per set that carry the divergence probe.
    """

    def __init__(self, depth: int = 3, channels: int = 32, guide: str = "wiener",
                 train_images: int | None = None, quarter_turns: bool = False, sure_blend: bool = False,
                 sure_probes: int = 256) -> None:
        super().__init__()
        if guide not in GUIDES:
            raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}")
        if train_images is not None and train_images < 1:
            raise ValueError(f"train_images must be >= 1 or None, got {train_images}")
        if sure_probes < 1:
            raise ValueError(f"sure_probes must be >= 1, got {sure_probes}")
        self.guide, self.train_images, self.quarter_turns = guide, train_images, quarter_turns
        self.sure_blend, self.sure_probes = sure_blend, sure_probes
        self.net = UNet(depth=depth, channels=channels, in_channels=2)
        nn.init.zeros_(self.net.head.weight)
        nn.init.zeros_(self.net.head.bias)

    def forward(self, noisy: torch.Tensor, ctf: torch.Tensor | None = None,
                noise_variance: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N, L, L)`` noisy sets -> ``(B, N, L, L)`` estimates of the clean CTF-affected images.

        Args:
            noisy: images of ``B`` sets.
            ctf: ``(B, N, L, L)`` centred CTFs (None: no CTF).
            noise_variance: ``(B,)`` per-pixel noise variance (None: 1, background-normalised data).
        """
        B, N, L, W = noisy.shape
        if ctf is None:
            ctf = torch.ones_like(noisy)
        if noise_variance is None:
            noise_variance = torch.ones(B, device=noisy.device, dtype=noisy.dtype)
        ctf = ctf.expand_as(noisy)
        guide = self._guide(noisy, ctf, noise_variance)
        sd = noise_variance.to(noisy.dtype).clamp_min(1e-12).sqrt().reshape(B, 1, 1, 1)
        k = N if not (self.training and self.train_images) else min(N, self.train_images)
        correction = self._corrections(noisy[:, :k], guide[:, :k], sd)
        if self.sure_blend and not self.training:
            correction = self._sure_weighted(noisy, ctf, noise_variance, guide, correction, sd)
        refined = guide[:, :k] + correction
        return refined if k == N else torch.cat([refined, guide[:, k:]], dim=1)

    def _guide(self, noisy: torch.Tensor, ctf: torch.Tensor, noise_variance: torch.Tensor) -> torch.Tensor:
        if self.guide == "wiener":
            return wiener_denoise(noisy, ctf, noise_variance)
        return cwf_denoise(noisy, ctf, noise_variance)

    def _corrections(self, noisy: torch.Tensor, guide: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
        """The U-Net's correction ``(B, k, L, L)`` in image units, from the noisy images and their guide."""
        B, k, L, W = noisy.shape
        x = torch.stack([noisy / sd, guide / sd], dim=2).reshape(B * k, 2, L, W)
        if self.training:
            correction = self.net.correction(x)
        else:  # in chunks of images: sets of a thousand at L = 128 would hold gigabytes of features
            chunk = max(1, _EVAL_PIXELS // (L * W))
            correction = torch.cat([self._correction(x[i:i + chunk]) for i in range(0, len(x), chunk)])
        return correction.reshape(B, k, L, W) * sd

    def _sure_weighted(self, noisy: torch.Tensor, ctf: torch.Tensor, noise_variance: torch.Tensor,
                       guide: torch.Tensor, correction: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
        """The correction weighted per frequency ring by SURE (:mod:`cryo_lightning.denoise.sure`):
        the first ``sure_probes`` images of each set carry a Gaussian probe of ``eps = 0.05 sigma``,
        and the guide is refitted to the probed set, so the divergence includes the guide's
        dependence on the set. The probe is seeded: the same input gives the same output."""
        S = min(noisy.shape[1], self.sure_probes)
        generator = torch.Generator(device=noisy.device).manual_seed(0)
        probe = torch.randn(noisy[:, :S].shape, generator=generator, device=noisy.device, dtype=noisy.dtype)
        eps = 0.05 * sd  # small against the noise, large against float32 round-off in the U-Net
        probed = noisy.clone()
        probed[:, :S] += eps * probe
        guide_probed = self._guide(probed, ctf, noise_variance)
        response = (self._corrections(probed[:, :S], guide_probed[:, :S], sd) - correction[:, :S]) / eps
        weights = sure_ring_weights(noisy, guide, correction, probe, response, noise_variance)
        return apply_ring_weights(correction, weights)

    def _correction(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quarter_turns:
            return self.net.correction(x)
        return sum(torch.rot90(self.net.correction(torch.rot90(x, t, (-2, -1))), -t, (-2, -1)) for t in range(4)) / 4
