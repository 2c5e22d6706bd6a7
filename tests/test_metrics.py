"""Relative MSE and PSNR against hand-computed values."""

from __future__ import annotations

import math

import torch

from cryo_lightning.metrics import psnr, relative_mse


def test_relative_mse_per_image():
    target = torch.zeros(2, 3, 4, 4)
    target[..., 1, 1] = 2.0  # ||x||^2 = 4 per image
    estimate = target.clone()
    estimate[0, :, 0, 0] = 1.0  # error 1 -> 0.25
    out = relative_mse(estimate, target)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out[0], torch.full((3,), 0.25))
    torch.testing.assert_close(out[1], torch.zeros(3))
    torch.testing.assert_close(relative_mse(torch.zeros_like(target), target), torch.ones(2, 3))


def test_psnr_uses_target_range():
    target = torch.zeros(8, 8)
    target[0, 0] = 4.0  # peak-to-peak 4
    estimate = target + 0.5  # mse 0.25
    assert abs(float(psnr(estimate, target)) - 10 * math.log10(16 / 0.25)) < 1e-4


def test_frc_curve_identical_and_opposite():
    from cryo_lightning.metrics import frc_curve

    x = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(frc_curve(x, x)[..., 1:], torch.ones(3, 8))
    torch.testing.assert_close(frc_curve(-x, x)[..., 1:], -torch.ones(3, 8))
