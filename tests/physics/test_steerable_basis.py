"""Steerable Fourier-Bessel basis: Bessel functions, round trip, steerability, orthonormality, filters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import torch

from cryo_lightning.physics.steerable_basis import FourierBesselBasis, bessel_j, bessel_j_zeros, fourier_bessel_basis
from cryo_lightning.physics.fourier import fft2c, ifft2c, radial_grid

L = 32


@pytest.fixture(scope="module")
def basis() -> FourierBesselBasis:
    return fourier_bessel_basis(L, dtype=torch.float64)


def _blobs(centres: torch.Tensor, widths: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum of isotropic Gaussians at ``(x, y)`` pixel offsets from the centre ``L // 2``."""
    c = torch.arange(L, dtype=torch.float64) - L // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    d2 = (x[None] - centres[:, 0, None, None]) ** 2 + (y[None] - centres[:, 1, None, None]) ** 2
    return (weights[:, None, None] * torch.exp(-d2 / (2 * widths[:, None, None] ** 2))).sum(0)


def _random_blobs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = 6
    radius = 9 * torch.rand(n, generator=g, dtype=torch.float64)
    angle = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    centres = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], -1)
    return centres, 1.8 + torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64) + 0.5


def test_bessel_functions_and_zeros_match_scipy():
    x = torch.linspace(0, 110, 2001, dtype=torch.float64)
    for n in (0, 1, 4, 17, 60, 95):
        np.testing.assert_allclose(bessel_j(n, x).numpy(), scipy.special.jv(n, x.numpy()), atol=1e-13)
    for n in (0, 3, 41):
        z = bessel_j_zeros(n, 80.0)
        ref = scipy.special.jn_zeros(n, 40)
        np.testing.assert_allclose(z.numpy(), ref[ref < 80.0], rtol=1e-13)


def test_truncation_rule_and_indices(basis):
    # Keep z_kq < pi L / 2 (ASPIRE's FBBasis2D rule); Q_k decreases with k.
    cutoff = math.pi * L / 2
    for k, q in enumerate(basis.block_sizes):
        zeros = scipy.special.jn_zeros(k, q + 1)
        assert zeros[q - 1] < cutoff <= zeros[q]
    assert scipy.special.jn_zeros(len(basis.block_sizes), 1)[0] >= cutoff
    assert basis.count == sum(basis.block_sizes) == len(basis.angular_index)
    assert all(a >= b for a, b in zip(basis.block_sizes, basis.block_sizes[1:]))


def test_expand_evaluate_round_trip_of_a_smooth_image(basis):
    image = _blobs(*_random_blobs(0))
    coeffs = basis.expand(image)
    assert coeffs.shape == (basis.count,) and coeffs.is_complex()
    assert coeffs[: basis.block_sizes[0]].imag.abs().max() == 0
    back = basis.evaluate(coeffs)
    assert ((back - image).square().sum() / image.square().sum()) < 1e-5


def test_rotation_multiplies_coefficients_by_phases(basis):
    centres, widths, weights = _random_blobs(1)
    alpha = 0.7
    rot = torch.tensor([[math.cos(alpha), -math.sin(alpha)], [math.sin(alpha), math.cos(alpha)]], dtype=torch.float64)
    image = _blobs(centres, widths, weights)
    rotated = _blobs(centres @ rot.T, widths, weights)  # I'(r, theta) = I(r, theta - alpha)
    predicted = basis.rotate(basis.expand(image), alpha)
    actual = basis.expand(rotated)
    assert (predicted - actual).abs().square().sum() / actual.abs().square().sum() < 1e-8
    # and the phases are exp(-i k alpha): the k = 3 block picks up exp(-3i alpha)
    a3, b3 = basis.split(basis.expand(image))[3], basis.split(actual)[3]
    torch.testing.assert_close(b3, a3 * complex(math.cos(3 * alpha), -math.sin(3 * alpha)), atol=1e-3 * a3.abs().max(), rtol=0)


def test_orthonormality_on_the_pixel_grid(basis):
    # evaluate(e_j) = 2 u cos(k theta) and evaluate(-i e_j) = 2 u sin(k theta) for k >= 1.
    eye = torch.eye(basis.count, dtype=torch.complex128)
    cos_part = basis.evaluate(eye).reshape(basis.count, -1)
    sin_part = basis.evaluate(-1j * eye).reshape(basis.count, -1)
    k0 = basis.angular_index == 0
    # The complex functions phi_kq = u (cos + i sin) are exactly orthonormal within each block k ...
    phi = torch.complex(cos_part, sin_part) / 2
    phi[k0] = cos_part[k0].to(phi.dtype)
    for k in (0, 1, 6, len(basis.block_sizes) - 1):
        block = phi[basis.angular_index == k]
        torch.testing.assert_close(block.conj() @ block.T, torch.eye(len(block), dtype=phi.dtype), atol=1e-10, rtol=0)
    # ... and the real basis (u_0q, sqrt(2) u cos, sqrt(2) u sin) is approximately orthonormal.
    real = torch.cat([cos_part[k0], cos_part[~k0] / math.sqrt(2), sin_part[~k0] / math.sqrt(2)])
    err = (real @ real.T - torch.eye(len(real), dtype=real.dtype)).abs()
    z = torch.cat(basis.zeros)
    z = torch.cat([z[k0], z[~k0], z[~k0]])
    low = z < math.pi * L / 4  # well below the band limit the square grid hardly matters
    assert err.median() < 1e-3
    assert err[low][:, low].max() < 0.01
    assert err.max() < 0.3  # near the band limit the grid aliases high angular frequencies


def test_white_noise_has_white_coefficients(basis):
    g = torch.Generator().manual_seed(3)
    noise = 2.0 * torch.randn(4000, L, L, generator=g, dtype=torch.float64)
    a = basis.split(basis.expand(noise))
    for k in (0, 2, 7):
        cov = a[k].T @ a[k].conj() / len(noise)
        torch.testing.assert_close(cov.real, 4.0 * torch.eye(len(cov), dtype=torch.float64), atol=0.35, rtol=0)


def test_radial_operator_matches_fourier_filtering(basis):
    image = _blobs(*_random_blobs(2))
    rho = radial_grid(L, 2, dtype=torch.float64)
    h = torch.exp(-((rho / 7.0) ** 2)) * torch.cos(rho / 2.5)  # radial, smooth, sign changes like a CTF
    filtered = ifft2c(fft2c(image) * h).real
    profile = basis.radial_profile(h)
    a, b = basis.split(basis.expand(image)), basis.split(basis.expand(filtered))
    for k in (0, 1, 4):
        H = basis.radial_operator(profile, k)
        torch.testing.assert_close(H, H.T)
        pred = H.to(torch.complex128) @ a[k]
        assert (pred - b[k]).abs().norm() <= 0.03 * b[k].abs().norm()
    ones = basis.radial_profile(torch.ones(L, L, dtype=torch.float64))
    torch.testing.assert_close(basis.radial_operator(ones, 2), torch.eye(basis.block_sizes[2], dtype=torch.float64))


def test_float32_basis_and_batch_shapes():
    b32 = FourierBesselBasis(16)
    x = torch.randn(2, 3, 16, 16)
    a = b32.expand(x)
    assert a.shape == (2, 3, b32.count) and a.dtype == torch.complex64
    assert b32.evaluate(a).shape == (2, 3, 16, 16) and b32.evaluate(a).dtype == torch.float32
