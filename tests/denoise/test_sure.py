"""SURE weights per frequency ring: Parseval, projectors, and the closed form of a linear problem."""

from __future__ import annotations

import torch

from cryo_lightning.denoise.sure import apply_ring_weights, ring_index, ring_inner, sure_ring_weights
from cryo_lightning.physics.fourier import fft2c, ifft2c, radial_grid


def _gaussian_field(n: int, L: int, spectrum: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``(1, n, L, L)`` stationary Gaussian images whose per-pixel power at radius ``r`` is ``spectrum(r)``."""
    white = torch.randn(1, n, L, L, generator=g, dtype=torch.float64)
    return ifft2c(fft2c(white) * spectrum.sqrt()).real


def test_ring_inner_sums_to_the_pixel_inner_product():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 17, 17, generator=g), torch.randn(2, 5, 17, 17, generator=g)
    per_ring = ring_inner(a, b, ring_index(17))
    assert per_ring.shape == (2, 17 // 2 + 1)
    torch.testing.assert_close(per_ring.sum(1), (a.double() * b.double()).sum((1, 2, 3)))


def test_ring_weights_are_orthogonal_projectors():
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ones = torch.ones(1, 9, dtype=torch.float64)
    torch.testing.assert_close(apply_ring_weights(x, ones), x)
    only3 = torch.zeros(1, 9, dtype=torch.float64)
    only3[0, 3] = 1
    p = apply_ring_weights(x, only3)
    torch.testing.assert_close(apply_ring_weights(p, only3), p)  # idempotent
    torch.testing.assert_close(apply_ring_weights(x - p, only3), torch.zeros_like(x), atol=1e-12, rtol=0)


def test_weights_of_the_identity_correction_are_the_wiener_gains():
    """Guide 0 and correction ``c(y) = y`` (divergence exactly the ring's size): SURE's optimum per
    ring is the Wiener gain ``S_k / (S_k + sigma^2)`` of a stationary Gaussian signal with radial
    spectrum ``S``, a closed form that the noisy images alone must recover."""
    L, n, sigma2 = 32, 400, 2.0
    g = torch.Generator().manual_seed(2)
    r = radial_grid(L, 2, dtype=torch.float64)
    spectrum = 8.0 * torch.exp(-(r / 6.0) ** 2)  # per-pixel signal power at radius r
    clean = _gaussian_field(n, L, spectrum, g)
    noisy = clean + sigma2**0.5 * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    probe = torch.randn(1, 100, L, L, generator=g, dtype=torch.float64)
    w = sure_ring_weights(noisy, torch.zeros_like(noisy), noisy, probe, probe, torch.tensor([sigma2]))[0]
    rings = ring_index(L)
    gain = spectrum / (spectrum + sigma2)
    expected = torch.stack([gain[rings == k].mean() for k in range(L // 2 + 1)])
    assert (w[1:12] - expected[1:12]).abs().max() < 0.05, (w[:12], expected[:12])
    assert (w[20:] < 0.05).all()  # noise only: the correction is switched off
    # and the blend's error is the Wiener filter's, far below the noisy images'
    blend = apply_ring_weights(noisy, w[None])
    wiener = ifft2c(fft2c(noisy) * gain).real
    err = ((blend - clean) ** 2).mean() / ((wiener - clean) ** 2).mean()
    assert err < 1.03


def test_no_correction_power_gives_zero_weight_not_nan():
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    w = sure_ring_weights(x, x, torch.zeros_like(x), x[:, :2], torch.zeros_like(x[:, :2]), torch.ones(1))
    assert torch.equal(w, torch.zeros_like(w))
