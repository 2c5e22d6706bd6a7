from __future__ import annotations

import math

import pytest
import torch

from cryo_lightning.physics.noise import (
    add_white_noise,
    disk_mask,
    empirical_snr,
    estimate_noise_variance,
    signal_power,
)


def blobs(n: int, L: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, L, L)`` Gaussian blobs with random centres, widths and amplitudes."""
    r = torch.arange(L, dtype=torch.float32) - L // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    c = (torch.rand(n, 2, 1, 1, generator=generator) - 0.5) * L / 4
    w = 3.0 + 5.0 * torch.rand(n, 1, 1, generator=generator)
    a = 0.5 + torch.rand(n, 1, 1, generator=generator)
    return a * torch.exp(-((y - c[:, 0]) ** 2 + (x - c[:, 1]) ** 2) / (2 * w**2))


@pytest.mark.parametrize("L", [64, 65])
def test_disk_mask(L):
    m = disk_mask(L)
    assert m.shape == (L, L) and m.dtype == torch.bool
    assert m.sum().item() == pytest.approx(math.pi * (L / 2) ** 2, rel=0.01)
    c = L // 2
    r = torch.arange(L) - c
    inside = (r[:, None] ** 2 + r[None, :] ** 2) < (L / 2) ** 2
    assert torch.equal(m, inside)
    assert bool(m[c, 0]) == (L % 2 == 1)  # for even L, distance exactly L/2 is outside
    inner = m[1:, 1:] if L % 2 == 0 else m
    assert torch.equal(inner, torch.flip(inner, (0, 1)))  # symmetric about the centre
    assert disk_mask(L, radius=10).sum().item() == pytest.approx(math.pi * 100, rel=0.05)


def test_signal_power_closed_form():
    clean = torch.full((2, 3, 32, 32), 2.0)
    clean[1] = 3.0
    clean[:, :, 0, :] = 100.0  # outside the disk: ignored
    torch.testing.assert_close(signal_power(clean), torch.tensor([4.0, 9.0]))
    assert signal_power(clean, dim=None).shape == (2, 3)
    assert signal_power(clean, dim=(0, 1)).item() == pytest.approx(6.5)
    assert signal_power(clean[0, 0], dim=None).item() == pytest.approx(4.0)


@pytest.mark.parametrize("snr", [1 / 4, 1 / 32, 1 / 100])
def test_add_white_noise_reaches_requested_snr(snr):
    g = torch.Generator().manual_seed(0)
    clean = blobs(64, 64, g)
    noisy, sigma2 = add_white_noise(clean, snr, generator=g)
    assert sigma2.shape == ()
    assert sigma2.item() == pytest.approx(signal_power(clean).item() / snr, rel=1e-6)
    assert empirical_snr(clean, noisy).item() == pytest.approx(snr, rel=0.05)
    assert (noisy - clean).var().item() == pytest.approx(sigma2.item(), rel=0.05)


def test_add_white_noise_per_set_snr_and_reproducible():
    clean = blobs(2 * 16, 32, torch.Generator().manual_seed(1)).reshape(2, 16, 32, 32)
    snr = torch.tensor([0.5, 0.02])
    noisy, sigma2 = add_white_noise(clean, snr, generator=torch.Generator().manual_seed(5))
    assert noisy.shape == clean.shape and sigma2.shape == (2,)
    torch.testing.assert_close(sigma2, signal_power(clean) / snr)
    torch.testing.assert_close(empirical_snr(clean, noisy), snr, rtol=0.05, atol=0)
    again, _ = add_white_noise(clean, snr, generator=torch.Generator().manual_seed(5))
    assert torch.equal(noisy, again)
    other, _ = add_white_noise(clean, snr, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(noisy, other)


def test_estimate_noise_variance_from_background():
    g = torch.Generator().manual_seed(3)
    sigma2 = 2.5
    pure = 7.0 + math.sqrt(sigma2) * torch.randn(64, 64, 64, generator=g)  # offset must not matter
    est = estimate_noise_variance(pure)
    assert est.shape == (64,)
    assert est.mean().item() == pytest.approx(sigma2, rel=0.03)
    # a signal confined to the disk does not bias the estimate
    clean = blobs(64, 64, g) * 50.0 * disk_mask(64, radius=24)
    torch.testing.assert_close(estimate_noise_variance(pure + clean), est)
