"""Particle images between pixel sizes: noise-preserving Fourier resampling, centred crops, and the
plan that takes a stack to a denoiser's scale and back.

Units: boxes in pixels, pixel sizes in Angstrom per pixel. Images are ``(..., L, L)`` with the
centre at index ``L // 2`` (docs/conventions.md).

:func:`fourier_resample` changes the pixel size and keeps the field of view: a centred crop (or
zero pad) of the centred spectrum, scaled by ``L_new / L`` rather than the ``(L_new / L)**2`` of
:func:`~cryo_lightning.physics.fourier.fourier_resize`, so that white noise of unit variance per
pixel keeps unit variance after a crop and keeps its power per Fourier coefficient after a pad: a
background-normalised image stays background-normalised, which is what a denoiser trained on
unit-variance noise expects. Even boxes have an unpaired Nyquist line; a pad splits it over
``+-L/2`` and a crop folds ``+-L_new/2`` back onto it, both with weight ``1/sqrt(2)``, so that a
pad followed by the crop back is exact and a crop keeps the noise variance on that line too.

:class:`ScalePlan` chains a centred real-space crop or zero pad (field of view, at the input's
pixel size) and a Fourier resample (pixel size): the model sees images of ``model_box`` pixels at
``model_pixel_size``; :meth:`ScalePlan.from_model` takes the model's output back to the input's
box and pixel size (a low-pass of the input band for a crop, exact for a pad).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryo_lightning.data.preprocess import PreprocessConfig, background_normalize
from cryo_lightning.physics.fourier import _crop_or_pad, fft2c, ifft2c
from cryo_lightning.physics.noise import disk_mask, estimate_noise_variance

__all__ = ["fourier_resample", "center_crop", "renormalize", "ScalePlan", "plan_scale", "in_range", "estimate_snr"]

# a pixel size within this relative distance of a range's end counts as inside it
RANGE_TOLERANCE = 0.01
MIN_BOX = 8


def _resample_axis(X: torch.Tensor, L_new: int, dim: int) -> torch.Tensor:
    """Centred crop or zero pad of the centred spectrum ``X`` along ``dim`` (see the module
    docstring for the Nyquist line of even sizes)."""
    L = X.shape[dim]
    if L_new == L:
        return X
    half = 1 / math.sqrt(2)
    if L_new < L:
        start = L // 2 - L_new // 2
        out = X.narrow(dim, start, L_new).clone()
        if L_new % 2 == 0:  # fold +L_new/2 onto the new Nyquist line -L_new/2 (index 0)
            folded = (X.narrow(dim, start, 1) + X.narrow(dim, start + L_new, 1)) * half
            out.narrow(dim, 0, 1).copy_(folded)
        return out
    shape = list(X.shape)
    shape[dim] = L_new
    out = X.new_zeros(shape)
    start = L_new // 2 - L // 2
    out.narrow(dim, start, L).copy_(X)
    if L % 2 == 0:  # split the Nyquist line -L/2 (index 0 of X) over -L/2 and +L/2
        nyquist = X.narrow(dim, 0, 1) * half
        out.narrow(dim, start, 1).copy_(nyquist)
        out.narrow(dim, start + L, 1).copy_(nyquist)
    return out


def fourier_resample(images: torch.Tensor, L_new: int) -> torch.Tensor:
    """Resample real images to ``L_new`` pixels per side over the same field of view.

    The pixel size becomes ``pixel_size * L / L_new``. Pixel values are scaled by ``L_new / L``:
    white noise of unit variance per pixel keeps unit variance after a crop (``L_new < L``), and
    a band-limited signal ``s`` becomes ``(L / L_new) * s`` sampled on the new grid. A pad then a
    crop back (``fourier_resample(fourier_resample(x, L2), L)`` with ``L2 > L``) returns ``x``
    to rounding error.

    Args:
        images: ``(..., L, L)`` real.
        L_new: new box size (pixels).
    Returns:
        ``(..., L_new, L_new)`` real, the dtype of ``images`` (float).
    """
    L = images.shape[-1]
    if L_new == L:
        return images
    X = fft2c(images)
    X = _resample_axis(_resample_axis(X, L_new, -1), L_new, -2)
    return ifft2c(X).real * (L_new / L)


def center_crop(images: torch.Tensor, L_new: int) -> torch.Tensor:
    """Centred real-space crop or zero pad of ``(..., L, L)`` images to ``(..., L_new, L_new)``
    (pixel ``L // 2`` goes to ``L_new // 2``; the pixel size is unchanged)."""
    return _crop_or_pad(images, L_new, 2)


def renormalize(images: torch.Tensor, radius_fraction: float = PreprocessConfig().background_radius,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~cryo_lightning.data.preprocess.background_normalize` of ``(..., L, L)`` images and the
    map it applied: ``(normalised, mean, std)`` with ``normalised = (images - mean) / std``, both
    ``(..., 1, 1)``."""
    normalised = background_normalize(images, radius_fraction)
    flat_in, flat_out = images.flatten(-2), normalised.flatten(-2)
    std = (flat_in.std(-1) / flat_out.std(-1).clamp_min(torch.finfo(images.dtype).tiny))[..., None, None]
    mean = (flat_in.mean(-1)[..., None, None] - std * flat_out.mean(-1)[..., None, None])
    return normalised, mean, std


def in_range(value: float, bounds: tuple[float, float] | None, tolerance: float = RANGE_TOLERANCE) -> bool:
    """Whether ``value`` lies in ``[lo, hi]`` within a relative ``tolerance`` (True without bounds)."""
    if bounds is None:
        return True
    lo, hi = bounds
    return lo * (1 - tolerance) <= value <= hi * (1 + tolerance)


@dataclass(frozen=True)
class ScalePlan:
    """How images of ``box`` pixels at ``pixel_size`` reach a model and come back.

    To the model: a centred real-space crop or zero pad to ``crop`` pixels (at ``pixel_size``),
    then :func:`fourier_resample` to ``model_box`` pixels, so the model sees
    ``model_pixel_size = pixel_size * crop / model_box``. Back: the reverse.

    Attributes:
        box: the input's box (pixels).
        pixel_size: the input's pixel size (Angstrom).
        crop: the field of view given to the model, in input pixels.
        model_box: the box the model sees (pixels).
    """

    box: int
    pixel_size: float
    crop: int
    model_box: int

    @property
    def model_pixel_size(self) -> float:
        """Angstrom per pixel of the images the model sees."""
        return self.pixel_size * self.crop / self.model_box

    @property
    def scale(self) -> float:
        """Model pixel size over input pixel size (> 1: the model sees coarser pixels)."""
        return self.crop / self.model_box

    @property
    def identity(self) -> bool:
        """True when the model sees the input unchanged."""
        return self.crop == self.box == self.model_box

    @property
    def downsamples(self) -> bool:
        """True when the Fourier step is a crop (the model sees coarser pixels than the input)."""
        return self.model_box < self.crop

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        """``(..., box, box)`` -> ``(..., model_box, model_box)``."""
        return fourier_resample(center_crop(images, self.crop), self.model_box)

    def from_model(self, images: torch.Tensor) -> torch.Tensor:
        """``(..., model_box, model_box)`` -> ``(..., box, box)``; outside the model's field of
        view (when ``crop < box``) the output is 0."""
        return center_crop(fourier_resample(images, self.crop), self.box)

    def model_input(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the model sees of images background-normalised at the input's box.

        :meth:`to_model`, then, after a Fourier crop (:attr:`downsamples`), background-normalised
        again: the noise of real data is coloured, so its variance over the model's band is not
        the variance over the input's. After a pad the images are not renormalised, which keeps
        the noise power per Fourier coefficient that the model was trained with.

        Args:
            images: ``(..., box, box)``, background-normalised.
        Returns:
            ``(x, mean, std)``: ``x`` ``(..., model_box, model_box)`` and the background
            normalisation of ``to_model(images)``, ``(..., 1, 1)`` (0 and 1 for the identity plan),
            which :meth:`model_output` needs.
        """
        if self.identity:
            one = torch.ones((), dtype=images.dtype, device=images.device)
            return images, one - 1, one
        resampled = self.to_model(images)
        normalised, mean, std = renormalize(resampled)
        return (normalised if self.downsamples else resampled), mean, std

    def model_output(self, denoised: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                     model_scale: bool = False) -> torch.Tensor:
        """The model's output for :meth:`model_input`'s ``x`` in the units of the input's images.

        Args:
            denoised: ``(..., model_box, model_box)``.
            mean, std: from :meth:`model_input`.
            model_scale: keep the model's box and pixel size, in units of the background
                normalisation at that box; else back to ``(..., box, box)`` in the units of the
                input images.
        """
        if self.identity:
            return denoised
        if model_scale:
            return denoised if self.downsamples else (denoised - mean) / std
        return self.from_model(denoised * std + mean if self.downsamples else denoised)


def _pick_size(ideal: float, pixel_of, target: float, bounds: tuple[float, float], even: bool) -> int:
    """The integer (even when ``even``) box near ``ideal`` whose resulting pixel size
    ``pixel_of(size)`` lies in ``bounds`` and is nearest ``target`` (nearest overall if none does)."""
    step = 2 if even else 1
    low = max(MIN_BOX, int(math.floor(ideal / step)) * step)
    candidates = sorted({low, low + step, max(MIN_BOX, int(math.ceil(ideal / step)) * step)})
    inside = [c for c in candidates if in_range(pixel_of(c), bounds, 0.0)]
    pool = inside or candidates
    return min(pool, key=lambda c: abs(math.log(pixel_of(c) / target)))


def plan_scale(box: int, pixel_size: float, pixel_size_range: tuple[float, float] | None = None,
               fixed_box: int | None = None, max_box: int | None = None) -> ScalePlan:
    """The :class:`ScalePlan` for a model trained at ``pixel_size_range`` (Angstrom; None: unknown).

    - A model that takes any box (``fixed_box`` None) sees the input's pixel size when it lies in
      the range (within 1%) or the range is unknown; otherwise the nearest end of the range: the
      whole field of view is Fourier-resampled to the even box ``box * pixel_size / end`` (rounded
      so that the pixel size lands in the range, at least 8 pixels).
    - A model with a fixed box sees the whole field of view Fourier-resampled to ``fixed_box``
      when the resulting pixel size ``pixel_size * box / fixed_box`` lies in the range (or the
      range is unknown). Otherwise it sees the nearest end of the range, over the field of view
      that ``fixed_box`` pixels cover there: the input is centre-cropped (field of view too large)
      or zero-padded (too small) to that many input pixels, then Fourier-resampled.

    Args:
        box: the input's box (pixels).
        pixel_size: the input's pixel size (Angstrom).
        pixel_size_range: ``(lo, hi)`` the model was trained at, or None.
        fixed_box: the model's box if it has one (e.g. ``PolarSetTransformer.L``), else None.
        max_box: for a model that takes any box, the largest it should see (its cost grows
            faster than the box, e.g. a CWF guide's dense steerable basis): a larger box is
            Fourier-downsampled to ``max_box`` (coarser pixels) as far as the range allows, and
            beyond that centre-cropped to the field of view ``max_box`` pixels cover at the
            coarsest pixel size of the range.
    """
    plan = _plan_scale(box, pixel_size, pixel_size_range, fixed_box)
    if fixed_box is not None or max_box is None or plan.model_box <= max_box:
        return plan
    max_box -= max_box % 2
    hi = math.inf if pixel_size_range is None else pixel_size_range[1]
    if pixel_size * box / max_box <= hi * 1.01:  # the whole field of view at coarser pixels
        return ScalePlan(box, pixel_size, box, max_box)
    crop = min(box, int(round(max_box * hi / pixel_size)))
    return ScalePlan(box, pixel_size, crop, max_box)


def _plan_scale(box: int, pixel_size: float, pixel_size_range: tuple[float, float] | None,
                fixed_box: int | None) -> ScalePlan:
    seen = pixel_size if fixed_box is None else pixel_size * box / fixed_box  # with no crop
    if pixel_size_range is None or in_range(seen, pixel_size_range):
        return ScalePlan(box, pixel_size, box, box if fixed_box is None else fixed_box)
    lo, hi = pixel_size_range
    target = lo if seen < lo else hi
    if fixed_box is None:
        model_box = _pick_size(box * pixel_size / target, lambda m: pixel_size * box / m, target,
                               pixel_size_range, even=True)
        return ScalePlan(box, pixel_size, box, model_box)
    crop = _pick_size(fixed_box * target / pixel_size, lambda c: pixel_size * c / fixed_box, target,
                      pixel_size_range, even=False)
    return ScalePlan(box, pixel_size, crop, fixed_box)


def estimate_snr(images: torch.Tensor) -> float:
    """SNR of background-normalised particle images, as the simulations define it (signal power
    inside the inscribed disk over the noise variance, docs/conventions.md §7): the mean power
    inside the disk minus the noise variance (from the corners outside it), over the noise
    variance, clamped at 1e-4.

    Args:
        images: ``(n, L, L)`` (any leading shape), background mean 0.
    """
    disk = disk_mask(images.shape[-1], device=images.device)
    noise = float(estimate_noise_variance(images).mean())
    power = float(images[..., disk].square().mean())
    return max((power - noise) / max(noise, 1e-12), 1e-4)
