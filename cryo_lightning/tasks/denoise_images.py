"""A shipped or trained denoiser applied to particle images held in memory, in random context sets."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from cryo_lightning.data.context_sets import context_sets
from cryo_lightning.data.preprocess import PreprocessConfig, Preprocessor
from cryo_lightning.data.resample import estimate_snr
from cryo_lightning.physics.ctf import CTFParams
from cryo_lightning.tasks.model_inputs import default_set_size, range_warnings, scale_plan
from cryo_lightning.tasks.pretrained import load_denoiser

__all__ = ["denoise_images"]


@torch.no_grad()
def denoise_images(spec: str, images: torch.Tensor, pixel_sizes: torch.Tensor, ctf_params: CTFParams | None,
                   stored_mode: str, set_size: int | None = None, seed: int = 0, pixel: float | None = None,
                   option: str = "--denoiser", warn: Callable[[str], None] | None = None) -> torch.Tensor:
    """Denoise background-normalised images with a shipped model or a checkpoint, as ``cryol
    denoise`` does: at the model's box and pixel size, in random context sets.

    Args:
        spec: a shipped model's name or a checkpoint path (:func:`~cryo_lightning.tasks.pretrained.load_denoiser`).
        images: ``(n, L, L)`` background-normalised particles.
        pixel_sizes: ``(n,)`` Angstrom per pixel of ``images``.
        ctf_params: the particles' CTFs, or None without CTF.
        stored_mode: the CTF mode of the images (:class:`~cryo_lightning.data.preprocess.PreprocessConfig`).
        set_size: particles per context set (None: the model card's).
        seed: seeds the random grouping.
        pixel: the pixel size the scale plan is made for (default the median of ``pixel_sizes``).
        option: the command-line option that named ``spec``, for error messages.
        warn: receives warnings about inputs outside the model's training range.
    Returns:
        ``(n, L, L)`` CTF-affected clean estimates at box ``L``, in the units of ``images``.
    """
    task, card = load_denoiser(spec, images.device, option=option)
    pixel = float(pixel_sizes.median()) if pixel is None else pixel
    plan = scale_plan(task, card, images.shape[-1], pixel)
    snr = estimate_snr(plan.model_input(images[:256])[0]) if card.snr_range is not None else None
    for message in range_warnings(card, plan, snr):
        if warn is not None:
            warn(message)
    ctf_processor = Preprocessor(PreprocessConfig(normalize=False), plan.model_box)
    pixels = pixel_sizes.to(images.device) * plan.scale
    out = torch.empty_like(images)
    for members in tqdm(context_sets(len(images), set_size or default_set_size(card), "random", seed),
                        desc="denoising", unit="set", disable=None):
        idx = torch.as_tensor(members, device=images.device)
        x, mean, std = plan.model_input(images[idx])
        params = None if ctf_params is None else ctf_params[members]
        ctf = ctf_processor(x, pixels[idx], torch.ones_like(pixels[idx]), params, stored_mode)["ctf"].expand_as(x)
        out[idx] = plan.model_output(task(x[None], ctf[None], torch.ones(1, device=images.device))[0], mean, std)
    return out
