"""Preprocessing: normalisation, downsampling, phase flipping, whitening and the effective CTF."""

from __future__ import annotations

import pytest
import torch

from cryo_lightning.data.preprocess import PreprocessConfig, Preprocessor, background_normalize, noise_spectrum
from cryo_lightning.physics.ctf import apply_ctf, ctf_2d, random_ctf_params
from cryo_lightning.physics.fourier import fft2c, ifft2c
from cryo_lightning.physics.noise import disk_mask


def _blobs(n: int, L: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(L, dtype=torch.float32) - L // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    centres = (torch.rand(n, 2, generator=g) - 0.5) * L * 0.3
    return torch.exp(-((x - centres[:, 0, None, None]) ** 2 + (y - centres[:, 1, None, None]) ** 2) / 18.0)


def test_background_normalize_gives_zero_mean_unit_std_background():
    g = torch.Generator().manual_seed(0)
    images = 5.0 + 3.0 * torch.randn(4, 48, 48, generator=g) + 40 * _blobs(4, 48)
    out = background_normalize(images, 0.75)
    background = ~disk_mask(48, 0.75 * 24)
    values = out[:, background]
    torch.testing.assert_close(values.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(values.std(-1), torch.ones(4), atol=1e-5, rtol=0)


def test_downsample_updates_pixel_size_and_sign():
    pre = Preprocessor(PreprocessConfig(out_box=32, normalize=False), box=64)
    images = _blobs(3, 64)
    out = pre(images, torch.full((3,), 1.5), torch.tensor([1.0, -1.0, 1.0]), None, "none")
    assert out["images"].shape == (3, 32, 32)
    torch.testing.assert_close(out["pixel_size"], torch.full((3,), 3.0))
    # Fourier cropping preserves the mean; the data sign multiplies
    torch.testing.assert_close(out["images"].mean((-1, -2)), images.mean((-1, -2)) * torch.tensor([1.0, -1.0, 1.0]),
                               atol=1e-5, rtol=1e-4)
    assert out["ctf_mode"] == "none" and torch.all(out["ctf"] == 1)


def test_phase_flip_and_effective_ctf_modes():
    L, p = 64, 2.0
    params = random_ctf_params(3, generator=torch.Generator().manual_seed(1))
    ctf = ctf_2d(params, L, p)
    clean = _blobs(3, L)
    observed = apply_ctf(clean, ctf)
    pre = Preprocessor(PreprocessConfig(normalize=False, phase_flip=True), box=L)
    out = pre(observed, torch.full((3,), p), torch.ones(3), params, "full")
    assert out["ctf_mode"] == "phase_flipped"
    torch.testing.assert_close(out["ctf"], ctf.abs())
    torch.testing.assert_close(out["images"], apply_ctf(clean, ctf.abs()), atol=1e-5, rtol=0)
    for mode, expected in [("full", ctf), ("premultiplied", ctf * ctf), ("none", torch.ones_like(ctf))]:
        plain = Preprocessor(PreprocessConfig(normalize=False), box=L)
        got = plain(observed, torch.full((3,), p), torch.ones(3), params, mode)
        assert got["ctf_mode"] == mode
        torch.testing.assert_close(got["ctf"], expected)


def test_whitening_flattens_coloured_noise():
    L, n = 64, 64
    g = torch.Generator().manual_seed(2)
    white = torch.randn(n, L, L, generator=g)
    ky, kx = torch.meshgrid(*(2 * [(torch.arange(L) - L // 2) / L]), indexing="ij")
    colour = 1.0 / (1.0 + 40 * (kx**2 + ky**2))  # strong low-pass noise
    coloured = ifft2c(fft2c(white) * colour).real
    psd = noise_spectrum(coloured)
    pre = Preprocessor(PreprocessConfig(normalize=False, whiten=True), box=L, noise_psd=psd)
    out = pre(coloured, torch.ones(n), torch.ones(n), None, "none")
    power = fft2c(out["images"]).abs().square().mean(0)
    rings = [power[(kx**2 + ky**2).sqrt().sub(r).abs() < 0.02].mean() for r in (0.05, 0.2, 0.4)]
    assert max(rings) / min(rings) < 1.3  # flat within 30% (it spans > 10x before)
    before = fft2c(coloured).abs().square().mean(0)
    raw = [before[(kx**2 + ky**2).sqrt().sub(r).abs() < 0.02].mean() for r in (0.05, 0.4)]
    assert raw[0] / raw[1] > 10
    torch.testing.assert_close(out["ctf"], psd.clamp_min(1e-6).rsqrt().expand(n, L, L))


def test_config_validation():
    with pytest.raises(ValueError, match="ctf_mode"):
        PreprocessConfig(ctf_mode="flipped")
    with pytest.raises(ValueError, match="noise spectrum"):
        Preprocessor(PreprocessConfig(whiten=True), box=32)(torch.zeros(1, 32, 32), torch.ones(1), torch.ones(1), None, "none")


def test_background_normalize_keeps_noise_free_images_finite():
    image = torch.zeros(2, 24, 24)
    image[:, 8:16, 8:16] = torch.tensor([1.0, 3.0])[:, None, None]  # flat (zero) background
    out = background_normalize(image)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.flatten(1).std(-1), torch.ones(2))
    assert float(out[..., ~disk_mask(24, 0.75 * 12)].abs().max()) == 0.0
