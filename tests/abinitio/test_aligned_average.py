"""Aligned averages: the sense of rotation and shift, and the plain mean."""

from __future__ import annotations

import math

import torch

from cryo_lightning.abinitio.aligned_average import aligned_average
from cryo_lightning.physics.steerable_basis import fourier_bessel_basis


def test_average_rotates_counter_clockwise_and_shifts_like_translate_spectrum():
    L = 33  # odd: a quarter turn maps the whole frequency grid onto itself, so it is exact
    img = torch.randn(1, L, L, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    quarter = aligned_average(img[None], torch.full((1, 1), math.pi / 2, dtype=torch.float64),
                              torch.zeros(1, 1, 2, dtype=torch.float64))[0]
    # rotate(I, a)(r) = I(R_{-a} r): for a = 90 degrees, I'(x, y) = I(y, -x), pixel [y, x] <- [c - x, c + y]
    c = L // 2
    idx = torch.arange(L) - c
    expected = img[0][(c - idx)[None, :], (c + idx)[:, None]]
    torch.testing.assert_close(quarter, expected)
    moved = aligned_average(img[None], torch.zeros(1, 1, dtype=torch.float64),
                            torch.tensor([[[2.0, -1.0]]], dtype=torch.float64))[0]
    torch.testing.assert_close(moved, torch.roll(img[0], shifts=(-1, 2), dims=(-2, -1)))
    # the steerable basis uses the same sense of rotation
    basis = fourier_bessel_basis(L, dtype=torch.float64)
    torch.testing.assert_close(basis.evaluate(basis.rotate(basis.expand(img), math.pi / 2)),
                               basis.evaluate(basis.expand(quarter[None])), atol=1e-9, rtol=0)


def test_plain_average_with_no_ctf_and_no_wiener_term_is_the_mean():
    x = torch.randn(2, 5, 16, 16, generator=torch.Generator().manual_seed(1))
    avg = aligned_average(x, torch.zeros(2, 5), torch.zeros(2, 5, 2))
    torch.testing.assert_close(avg, x.mean(1), atol=1e-5, rtol=0)
