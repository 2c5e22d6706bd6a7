"""Particle preprocessing, in torch on the device: sign, Fourier downsampling, background
normalisation, phase flipping, whitening, and the effective CTF of the processed images.

The order is fixed: data sign and contrast inversion -> Fourier downsampling -> background
normalisation -> phase flipping -> whitening. The CTF returned with a batch is the operator that
maps a projection to the processed image (``ctf_mode``): the CTF itself for raw images, ``|CTF|``
after phase flipping, ``CTF^2`` for CTF-premultiplied data, 1 for data without a CTF; whitening
multiplies it by the whitening filter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cryo_lightning.physics.ctf import CTFParams, ctf_2d, phase_flip
from cryo_lightning.physics.fourier import fft2c, fourier_resize, ifft2c, radial_grid, shell_average
from cryo_lightning.physics.noise import disk_mask

__all__ = ["CTF_MODES", "PreprocessConfig", "background_stats", "background_normalize",
           "normalization_stats", "noise_spectrum", "Preprocessor"]

CTF_MODES = ("full", "phase_flipped", "premultiplied", "none")


@dataclass
class PreprocessConfig:
    """What to do to particle images before they reach a model.

    Attributes:
        out_box: output box size, or None to keep the stored one: a smaller box crops the
            spectrum (the pixel size grows accordingly), a larger one zero-pads it (finer pixels).
        normalize: subtract the background mean and divide by the background standard deviation
            (background = pixels at or beyond ``background_radius`` from the centre).
        background_radius: fraction of ``L / 2`` where the background starts (RELION's default
            particle diameter leaves 0.75).
        invert_contrast: multiply by -1 on top of the data sign (for data of the wrong contrast).
        ctf_mode: what the stored images are: ``"full"`` (raw, CTF-affected; RELION's default),
            ``"phase_flipped"``, ``"premultiplied"`` (multiplied by the CTF, e.g. Warp) or
            ``"none"`` (no CTF, e.g. negative stain or CTF-free simulations). None: from the
            metadata (premultiplied when flagged, none without CTF columns, else full).
        phase_flip: phase-flip full-CTF images (their ctf_mode becomes ``"phase_flipped"``).
        whiten: divide by the square root of the noise power spectrum estimated from the
            particle background (see :func:`noise_spectrum`).
    """

    out_box: int | None = None
    normalize: bool = True
    background_radius: float = 0.75
    invert_contrast: bool = False
    ctf_mode: str | None = None
    phase_flip: bool = False
    whiten: bool = False

    def __post_init__(self) -> None:
        if self.ctf_mode is not None and self.ctf_mode not in CTF_MODES:
            raise ValueError(f"ctf_mode must be one of {CTF_MODES} or None, got {self.ctf_mode!r}")
        if not 0 < self.background_radius <= 1:
            raise ValueError(f"background_radius must be in (0, 1], got {self.background_radius}")


def background_stats(images: torch.Tensor, radius_fraction: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation ``(..., 1, 1)`` of each image's background: the pixels at
    distance ``>= radius_fraction * L / 2`` from the centre ``L // 2``."""
    background = ~disk_mask(images.shape[-1], radius_fraction * images.shape[-1] / 2, device=images.device)
    values = images[..., background]
    return values.mean(-1)[..., None, None], values.std(-1)[..., None, None]


def background_normalize(images: torch.Tensor, radius_fraction: float = 0.75) -> torch.Tensor:
    """Zero mean and unit standard deviation of each image's background.

    Noise-free images (simulations) have a flat background; they are scaled by the standard
    deviation of the whole image instead, so they stay finite and of order one.

    Args:
        images: ``(..., L, L)``.
        radius_fraction: the background is every pixel at distance ``>= radius_fraction * L / 2``
            from the centre ``L // 2``.
    """
    mean, std = normalization_stats(images, radius_fraction)
    return (images - mean) / std


def normalization_stats(images: torch.Tensor, radius_fraction: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and standard deviation ``(..., 1, 1)`` that :func:`background_normalize` uses: the
    background's (:func:`background_stats`), or the whole image's standard deviation for a flat
    background."""
    mean, std = background_stats(images, radius_fraction)
    whole = images.flatten(-2).std(-1)[..., None, None]
    flat = std <= 1e-6 * whole
    return mean, torch.where(flat, whole, std).clamp_min(torch.finfo(images.dtype).tiny)


def noise_spectrum(images: torch.Tensor, radius_fraction: float = 0.75) -> torch.Tensor:
    """Radially averaged noise power spectrum from the particle background, mean 1.

    The particle disk is zeroed and the power of the remaining background is averaged over
    images and one-pixel shells; the mask's own spectral leakage blurs it slightly, which is
    harmless for a smooth noise spectrum.

    Args:
        images: ``(n, L, L)`` (any leading shape), background-normalised or not.
    Returns:
        ``(L, L)`` power per centred frequency, normalised to mean 1.
    """
    L = images.shape[-1]
    background = ~disk_mask(L, radius_fraction * L / 2, device=images.device)
    centred = images - (images * background).sum((-2, -1), keepdim=True) / background.sum()
    power = fft2c(centred * background).abs().square().reshape(-1, L, L).mean(0)
    profile = shell_average(power, 2)  # (L // 2 + 1,)
    shells = torch.round(radial_grid(L, 2, device=images.device)).long().clamp_max(L // 2)
    psd = profile[shells]
    return psd / psd.mean()


class Preprocessor:
    """Applies a :class:`PreprocessConfig` to batches of particles on their device.

    Args:
        config: the settings.
        box: stored box size ``L``.
        noise_psd: ``(L_out, L_out)`` noise spectrum for whitening (from :func:`noise_spectrum` on
            preprocessed-but-not-whitened images); must be set before whitened batches are made.
    """

    def __init__(self, config: PreprocessConfig, box: int, noise_psd: torch.Tensor | None = None) -> None:
        self.config, self.box = config, box
        self.noise_psd = noise_psd

    @property
    def out_box(self) -> int:
        return self.config.out_box or self.box

    def ctf_mode(self, stored_mode: str) -> str:
        """The CTF mode of the processed images, given that of the stored ones."""
        if self.config.phase_flip and stored_mode == "full":
            return "phase_flipped"
        return stored_mode

    def __call__(
        self,
        images: torch.Tensor,
        pixel_size: torch.Tensor,
        data_sign: torch.Tensor,
        ctf_params: CTFParams | None,
        stored_mode: str,
        whiten: bool = True,
    ) -> dict[str, torch.Tensor | str]:
        """Process a batch.

        Args:
            images: ``(..., L, L)`` any real dtype (float16 is converted here, on the device).
            pixel_size: ``(...)`` Angstrom per pixel of the stored images.
            data_sign: ``(...)`` +1 or -1 (cryoSPARC ``blob/sign``; RELION +1).
            ctf_params: per-particle CTF ``(...)``, or None without CTF (or when the caller
                does not need the CTF: then the returned ``ctf`` is ones).
            stored_mode: the stored images' CTF mode (see :class:`PreprocessConfig`).
            whiten: apply whitening when the config asks for it (False while estimating the
                noise spectrum itself).
        Returns:
            dict with ``images`` ``(..., L_out, L_out)`` float32, ``pixel_size`` ``(...)``,
            ``ctf`` ``(..., L_out, L_out)`` (the effective CTF, see the module docstring),
            ``ctf_mode`` and, with ``normalize``, ``background`` ``(mean, std)`` ``(..., 1, 1)``:
            what the normalisation subtracted and divided by.
        """
        cfg = self.config
        x = images.float()
        sign = data_sign.to(x.device, torch.float32) * (-1.0 if cfg.invert_contrast else 1.0)
        if not bool((sign == 1).all()):  # skip a full pass over the batch for RELION data
            x = x * sign[..., None, None]
        L_out = self.out_box
        if L_out != x.shape[-1]:
            x = fourier_resize(x, L_out, 2)
        pixel = pixel_size.to(torch.float32) * (self.box / L_out)
        extra = {}
        if cfg.normalize:
            mean, std = normalization_stats(x, cfg.background_radius)
            x = (x - mean) / std
            extra["background"] = (mean, std)

        mode = self.ctf_mode(stored_mode)
        if stored_mode == "none" or ctf_params is None:
            # Broadcast view: no CTF to compute (no CTF in the data, or the caller needs none).
            ctf = torch.ones((), device=x.device).expand(x.shape)
        else:
            ctf = ctf_2d(ctf_params.to(x.device, torch.float32), L_out, pixel)
        if mode == "phase_flipped" and stored_mode == "full":
            x = phase_flip(x, ctf)
        if mode == "phase_flipped":
            effective = ctf.abs()
        elif mode == "premultiplied":
            effective = ctf * ctf
        elif mode == "none":
            effective = torch.ones_like(ctf)
        else:
            effective = ctf
        if cfg.whiten and whiten:
            if self.noise_psd is None:
                raise ValueError("whitening needs a noise spectrum: estimate one with noise_spectrum()")
            weight = self.noise_psd.to(x.device).clamp_min(1e-6).rsqrt()
            x = ifft2c(fft2c(x) * weight).real
            effective = effective * weight
        return {"images": x, "pixel_size": pixel, "ctf": effective, "ctf_mode": mode, **extra}
