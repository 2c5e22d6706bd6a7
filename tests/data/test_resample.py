"""Fourier resampling between pixel sizes and the plan that takes a stack to a model's scale.

References: exact round trips (pad then crop), white-noise variance, cosines sampled on the
continuous field of view, physics.fourier.fourier_resize (for odd boxes, which have no Nyquist
line), and hand-computed plans.
"""

from __future__ import annotations

import math

import pytest
import torch

from cryo_lightning.data.preprocess import background_normalize
from cryo_lightning.data.resample import (ScalePlan, center_crop, estimate_snr, fourier_resample, in_range, plan_scale,
                                          renormalize)
from cryo_lightning.physics.fourier import fourier_resize
from cryo_lightning.physics.noise import add_white_noise, disk_mask


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("small,large", [(32, 48), (31, 48), (32, 47), (33, 64), (64, 100), (16, 17)])
def test_pad_then_crop_is_exact(small, large):
    x = torch.randn(3, small, small, generator=_gen(small), dtype=torch.float64)
    up = fourier_resample(x, large)
    assert up.shape == (3, large, large)
    assert torch.allclose(fourier_resample(up, small), x, rtol=0, atol=1e-12)
    # and through a plan: a model at a finer pixel size sees the pad; its output comes back exactly
    plan = ScalePlan(small, 6.0, small, large)
    assert torch.allclose(plan.from_model(plan.to_model(x)), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("L,L_new", [(128, 64), (128, 63), (127, 64), (100, 32), (64, 62)])
def test_crop_keeps_unit_noise_variance(L, L_new):
    noise = torch.randn(1000, L, L, generator=_gen(L + L_new))
    var = float(fourier_resample(noise, L_new).var())
    # standard error of the variance of 1000 * L_new**2 unit Gaussians: under 0.2%
    assert abs(var - 1) < 0.01
    # physics.fourier.fourier_resize keeps the mean instead: the noise variance drops by (L_new / L)^2 (and
    # by a further 1 / L_new or so for an even L_new, whose Nyquist line it keeps only half of)
    assert float(fourier_resize(noise[:100], L_new, 2).var()) == pytest.approx((L_new / L) ** 2, rel=0.05)


def test_pad_keeps_noise_power_per_coefficient():
    noise = torch.randn(500, 32, 32, generator=_gen(1))
    up = fourier_resample(noise, 64)
    # the 32^2 coefficients keep their power, spread over 64^2 pixels: variance (32 / 64)^2
    assert float(up.var()) == pytest.approx(0.25, rel=0.02)


def test_band_limited_cosine_is_sampled_on_the_new_grid():
    L, L_new, k = 48, 30, 4  # k cycles over the field of view, well inside both bands
    def cosine(n):
        j = torch.arange(n, dtype=torch.float64) - n // 2
        return torch.cos(2 * math.pi * k * j / n + 0.3)[None, :] * torch.cos(2 * math.pi * 2 * j / n)[:, None]
    out = fourier_resample(cosine(L)[None], L_new)[0]
    assert torch.allclose(out, (L / L_new) * cosine(L_new), atol=1e-12)


def test_matches_fourier_resize_up_to_the_scale_for_odd_boxes():
    x = torch.randn(2, 33, 33, generator=_gen(2), dtype=torch.float64)
    for L_new in (21, 45):
        assert torch.allclose(fourier_resample(x, L_new), fourier_resize(x, L_new, 2) * 33 / L_new, atol=1e-12)


def test_center_crop_and_pad_keep_the_centre():
    x = torch.zeros(1, 10, 10)
    x[0, 5, 5] = 1.0
    assert center_crop(x, 7)[0, 3, 3] == 1 and center_crop(x, 7).sum() == 1
    assert center_crop(x, 16)[0, 8, 8] == 1 and center_crop(x, 16).sum() == 1


def test_renormalize_returns_the_map_it_applied():
    x = 3.0 * torch.randn(4, 32, 32, generator=_gen(3)) + 2.0
    normalised, mean, std = renormalize(x)
    assert torch.allclose(normalised, background_normalize(x))
    assert torch.allclose((x - mean) / std, normalised, atol=1e-5)
    assert torch.allclose(std.flatten(), torch.full((4,), 3.0), rtol=0.1)


@pytest.mark.parametrize("box,pixel,bounds,fixed,expected", [
    (64, 5.0, (4.0, 6.0), None, (64, 64)),      # inside: untouched
    (64, 4.02, (4.05, 6.0), None, (64, 64)),    # within 1% of the range
    (64, 1.0, (4.0, 6.0), None, (64, 16)),      # finer pixels: Fourier crop to 4 A
    (100, 1.0, (4.0, 8.0), None, (100, 24)),    # 25 -> the even box whose pixel (4.17 A) is in range
    (32, 12.0, (4.0, 6.0), None, (32, 64)),     # coarser pixels: pad to 6 A
    (64, 1.0, None, None, (64, 64)),            # unknown range: untouched
    (64, 4.0, None, 24, (64, 24)),              # fixed box, unknown range: whole field of view
    (256, 1.0, (4.0, 8.0), 32, (256, 32)),      # fixed box: whole field of view at 8 A is in range
    (64, 4.0, (8.0, 8.0), 24, (48, 24)),        # 10.7 A would be too coarse: crop 192 A at 8 A
    (20, 4.0, (8.0, 8.0), 24, (48, 24)),        # 3.3 A too fine: zero-pad to 192 A at 8 A
])
def test_plan_scale(box, pixel, bounds, fixed, expected):
    plan = plan_scale(box, pixel, bounds, fixed)
    assert (plan.crop, plan.model_box) == expected
    if bounds is not None and not in_range(pixel * box / (fixed or box), bounds):
        assert in_range(plan.model_pixel_size, bounds)


def test_model_input_and_output_units():
    noise = torch.randn(200, 64, 64, generator=_gen(4))
    # a crop (finer input): the model sees unit background variance; the round trip is the low-pass
    plan = plan_scale(64, 2.0, (4.0, 6.0))
    x, mean, std = plan.model_input(noise)
    assert x.shape == (200, 32, 32) and abs(float(x.var()) - 1) < 0.02
    assert torch.allclose(plan.model_output(x, mean, std), plan.from_model(plan.to_model(noise)), atol=1e-5)
    assert torch.equal(plan.model_output(x, mean, std, model_scale=True), x)
    # a pad (coarser input): not renormalised, and the output comes back exactly
    plan = plan_scale(64, 12.0, (4.0, 6.0))
    x, mean, std = plan.model_input(noise)
    assert x.shape == (200, 128, 128) and float(x.var()) == pytest.approx(0.25, rel=0.02)
    assert torch.allclose(plan.model_output(x, mean, std), noise, atol=1e-5)
    # the identity plan passes images through untouched
    plan = plan_scale(64, 5.0, (4.0, 6.0))
    x, mean, std = plan.model_input(noise)
    assert x is noise and plan.model_output(x, mean, std) is x


def test_estimate_snr_of_normalised_particles():
    L = 64
    g = _gen(5)
    disk = disk_mask(L, 0.3 * L)
    clean = (torch.randn(400, L, L, generator=g) + 1.0) * disk  # signal inside the particle only
    for snr in (1 / 8, 1.0):
        noisy, _ = add_white_noise(clean, snr, generator=g, dim=(-3,))
        estimate = estimate_snr(background_normalize(noisy))
        assert estimate == pytest.approx(snr, rel=0.1)
    assert estimate_snr(torch.randn(50, L, L, generator=g)) == 1e-4  # pure noise: clamped


def test_max_box_sends_large_particles_at_coarser_pixels_within_the_range():
    from cryo_lightning.data.resample import plan_scale

    # 320 px at 1.31 A (below a 1.5-12 A range): at most 128 px, the whole field of view, 3.27 A
    plan = plan_scale(320, 1.31, (1.5, 12.0), None, max_box=128)
    assert (plan.crop, plan.model_box) == (320, 128) and 1.5 <= plan.model_pixel_size <= 12.0
    # in range and small enough: untouched
    assert plan_scale(100, 4.0, (1.5, 12.0), None, max_box=128).identity
    # beyond what the coarsest pixel allows: the field of view 128 px cover at 12 A
    plan = plan_scale(2000, 1.0, (1.5, 12.0), None, max_box=128)
    assert plan.model_box == 128 and plan.crop == 1536 and plan.model_pixel_size == pytest.approx(12.0)
