"""Centred transforms, frequency grids, Fourier resizing, shells and FRC/FSC against references.

References: numpy's FFT, closed forms (deltas, plane waves, band-limited cosines sampled on
the continuous field of view), numpy bincounts, and Monte Carlo for the statistics of FRC.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryo_lightning.physics.fourier import (
    downsample,
    fft2c,
    fft3c,
    fftc,
    fourier_resize,
    fourier_shell_correlation,
    frequency_grid,
    ifft2c,
    ifft3c,
    ifftc,
    radial_grid,
    resolution_at,
    shell_average,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _numpy_shell_index(L: int, ndim: int) -> np.ndarray:
    """``round(|index - L // 2|)`` per sample, computed with numpy only."""
    c = np.arange(L) - L // 2
    grids = np.meshgrid(*([c] * ndim), indexing="ij")
    return np.rint(np.sqrt(sum(g.astype(np.float64) ** 2 for g in grids))).astype(np.int64)


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("L", [16, 17])
def test_fftc_matches_numpy_and_round_trips(ndim, L):
    g = _gen(L + ndim)
    x = torch.randn((2,) + (L,) * ndim, generator=g, dtype=torch.float64)
    axes = tuple(range(-ndim, 0))
    xn = x.numpy()
    expected = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(xn, axes=axes), axes=axes), axes=axes)
    X = fftc(x, ndim)
    np.testing.assert_allclose(X.numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(
        ifftc(X, ndim).numpy(),
        np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(expected, axes=axes), axes=axes), axes=axes),
        atol=1e-12,
    )
    # Round trips, for real and complex inputs; the named 2D/3D wrappers agree.
    torch.testing.assert_close(ifftc(X, ndim).real, x, atol=1e-12, rtol=0)
    z = torch.complex(x, torch.randn(x.shape, generator=g, dtype=torch.float64))
    torch.testing.assert_close(fftc(ifftc(z, ndim), ndim), z, atol=1e-12, rtol=0)
    fwd, inv = (fft2c, ifft2c) if ndim == 2 else (fft3c, ifft3c)
    torch.testing.assert_close(fwd(x), X, atol=0, rtol=0)
    torch.testing.assert_close(inv(X), ifftc(X, ndim), atol=0, rtol=0)
    # Normalisation: unnormalised forward (Parseval with a factor L**ndim).
    assert float(X.abs().square().sum()) == pytest.approx(L**ndim * float(x.square().sum()), rel=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("L", [8, 9])
def test_centre_is_index_L_over_2(ndim, L):
    """A delta at index L // 2 has a constant, real spectrum; DC sits at index L // 2."""
    c = L // 2
    delta = torch.zeros((L,) * ndim, dtype=torch.float64)
    delta[(c,) * ndim] = 1.0
    X = fftc(delta, ndim)
    torch.testing.assert_close(X, torch.ones_like(X), atol=1e-14, rtol=0)
    # A constant maps to L**ndim at the centre and zero elsewhere.
    K = fftc(torch.ones((L,) * ndim, dtype=torch.float64), ndim)
    expected = torch.zeros_like(K)
    expected[(c,) * ndim] = L**ndim
    torch.testing.assert_close(K, expected, atol=1e-10, rtol=0)
    # A delta one pixel off centre is no longer real.
    off = torch.roll(delta, 1, dims=-1)
    assert fftc(off, ndim).imag.abs().max() > 0.1


@pytest.mark.parametrize("L", [16, 17])
def test_frequency_grid_values_and_order(L):
    k = frequency_grid(L, 2, dtype=torch.float64)
    assert k.shape == (2, L, L)
    expected_1d = torch.tensor([(i - L // 2) / L for i in range(L)], dtype=torch.float64)
    ky, kx = k
    torch.testing.assert_close(ky, expected_1d[:, None].expand(L, L), atol=0, rtol=0)
    torch.testing.assert_close(kx, expected_1d[None, :].expand(L, L), atol=0, rtol=0)
    if L % 2 == 0:
        assert float(k.min()) == -0.5 and float(k.max()) < 0.5  # Nyquist at index 0
    else:
        assert float(k.abs().max()) < 0.5
    k3 = frequency_grid(L, 3, dtype=torch.float64)
    assert k3.shape == (3, L, L, L)
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = L
        torch.testing.assert_close(k3[axis], expected_1d.reshape(shape).expand(L, L, L), atol=0, rtol=0)
    torch.testing.assert_close(radial_grid(L, 3, dtype=torch.float64), L * k3.norm(dim=0), atol=1e-12, rtol=0)
    assert frequency_grid(L, 2).dtype == torch.float32


@pytest.mark.parametrize("L", [32, 33])
def test_plane_wave_peaks_at_its_frequency(L):
    """exp(+2 pi i (a x + b y) / L), x = column - L//2, peaks where frequency_grid = (b, a) / L.

    With pixel size p, that peak is the physical frequency (a, b) / (L p) 1/Angstrom.
    """
    a, b, p = 5, -3, 1.7
    idx = torch.arange(L, dtype=torch.float64) - L // 2
    y, x = torch.meshgrid(idx, idx, indexing="ij")
    wave = torch.exp(2j * math.pi * (a * x + b * y) / L)
    X = fftc(wave, 2)
    peak = divmod(int(X.abs().argmax()), L)
    assert peak == (L // 2 + b, L // 2 + a)
    assert float(X.abs().max()) == pytest.approx(L * L)
    ky, kx = frequency_grid(L, 2, dtype=torch.float64)
    assert (float(kx[peak]), float(ky[peak])) == pytest.approx((a / L, b / L))
    # Physical frequency in 1/Angstrom: the wave's period along x is L p / a Angstrom.
    assert float(kx[peak]) / p == pytest.approx(1.0 / (L * p / a))


# ----------------------------------------------------------------------------- resizing


def _cosines(L: int, ndim: int, freqs: np.ndarray, phases: np.ndarray, amps: np.ndarray, dc: float):
    """Sum of cosines with integer frequencies (cycles per field of view), sampled on L points.

    The continuous coordinate is ``t = (index - L // 2) / L`` field-of-view units per axis, so
    the same function is sampled whatever ``L`` is.
    """
    t = (np.arange(L) - L // 2) / L
    grids = np.meshgrid(*([t] * ndim), indexing="ij")  # array-axis order
    out = np.full((L,) * ndim, dc)
    for f, ph, am in zip(freqs, phases, amps):
        out += am * np.cos(2 * np.pi * sum(fi * gi for fi, gi in zip(f, grids)) + ph)
    return torch.from_numpy(out)


def _random_band_limited(ndim: int, fmax: int, seed: int, n: int = 6):
    rng = np.random.default_rng(seed)
    freqs = rng.integers(-fmax, fmax + 1, size=(n, ndim))
    return freqs, rng.uniform(0, 2 * np.pi, n), rng.uniform(0.5, 2.0, n), float(rng.normal())


@pytest.mark.parametrize(
    "ndim, L_big, L_small", [(2, 64, 32), (2, 45, 27), (2, 64, 33), (3, 32, 16), (3, 21, 15)]
)
def test_fourier_resize_of_band_limited_signal_is_exact(ndim, L_big, L_small):
    fmax = (min(L_big, L_small) - 1) // 2  # strictly below the smaller grid's Nyquist
    spec = _random_band_limited(ndim, fmax, seed=L_big + L_small + ndim)
    big, small = _cosines(L_big, ndim, *spec), _cosines(L_small, ndim, *spec)
    down = fourier_resize(big, L_small, ndim)
    assert down.shape == (L_small,) * ndim and down.dtype == torch.float64
    torch.testing.assert_close(down, small, atol=1e-10, rtol=0)
    torch.testing.assert_close(fourier_resize(small, L_big, ndim), big, atol=1e-10, rtol=0)
    torch.testing.assert_close(fourier_resize(big, L_big, ndim), big, atol=1e-12, rtol=0)
    # The pixel size scales with L_big / L_small (the field of view is kept).
    _, p = downsample(big, L_small, 1.3, ndim)
    assert p == pytest.approx(1.3 * L_big / L_small)


def test_downsample_by_two_doubles_pixel_size_and_removes_high_frequencies():
    low = _random_band_limited(2, 15, seed=1)
    high = (np.array([[20, 3], [-2, 25]]), np.array([0.3, 1.1]), np.array([1.0, 0.7]), 0.0)
    img = _cosines(64, 2, *low) + _cosines(64, 2, *high)
    out, p = downsample(img[None], 32, 2.0, ndim=2)
    assert out.shape == (1, 32, 32) and p == 4.0
    torch.testing.assert_close(out[0], _cosines(32, 2, *low), atol=1e-10, rtol=0)


@pytest.mark.parametrize("ndim, L, L_new", [(2, 32, 20), (2, 31, 48), (3, 16, 11), (3, 15, 24)])
def test_fourier_resize_preserves_mean(ndim, L, L_new):
    x = torch.rand((3,) + (L,) * ndim, generator=_gen(L), dtype=torch.float64) + 2.0
    y = fourier_resize(x, L_new, ndim)
    assert y.shape == (3,) + (L_new,) * ndim
    dims = tuple(range(-ndim, 0))
    torch.testing.assert_close(y.mean(dims), x.mean(dims), atol=1e-12, rtol=0)
    assert fourier_resize(x.float(), L_new, ndim).dtype == torch.float32


# ----------------------------------------------------------------------------- shells


@pytest.mark.parametrize("ndim, L", [(2, 32), (2, 33), (3, 16), (3, 17)])
def test_shell_average_of_radial_function_and_numpy_reference(ndim, L):
    shells = _numpy_shell_index(L, ndim)
    n_shells = L // 2 + 1
    profile = np.random.default_rng(L).normal(size=shells.max() + 1)
    radial = torch.from_numpy(profile[shells])
    got = shell_average(radial, ndim)
    assert got.shape == (n_shells,)
    np.testing.assert_allclose(got.numpy(), profile[:n_shells], atol=1e-12)
    # Arbitrary values, batched: compare with a numpy bincount of the same shells.
    values = torch.randn((2,) + (L,) * ndim, generator=_gen(L), dtype=torch.float64)
    keep = shells.ravel() < n_shells
    idx = shells.ravel()[keep]
    counts = np.bincount(idx, minlength=n_shells)
    for b in range(2):
        sums = np.bincount(idx, weights=values[b].numpy().ravel()[keep], minlength=n_shells)
        np.testing.assert_allclose(shell_average(values, ndim)[b].numpy(), sums / counts, atol=1e-12)


# ----------------------------------------------------------------------------- FRC / FSC


@pytest.mark.parametrize("ndim, L", [(2, 32), (2, 33), (3, 16), (3, 15)])
def test_frc_identical_opposite_and_scaled(ndim, L):
    x = torch.randn((2,) + (L,) * ndim, generator=_gen(ndim * L), dtype=torch.float64)
    ones = torch.ones(2, L // 2 + 1, dtype=torch.float64)
    torch.testing.assert_close(fourier_shell_correlation(x, x, ndim), ones, atol=1e-12, rtol=0)
    torch.testing.assert_close(fourier_shell_correlation(x, -x, ndim), -ones, atol=1e-12, rtol=0)
    torch.testing.assert_close(fourier_shell_correlation(x, 3.0 * x, ndim), ones, atol=1e-12, rtol=0)


def test_frc_of_independent_noise_is_zero_with_one_over_sqrt_n_spread():
    """For independent white noise the FRC in a shell of n pixels has mean 0 and std 1/sqrt(n).

    (Hermitian symmetry leaves n real degrees of freedom per shell, and the cosine between two
    independent isotropic vectors in R^n has variance 1/n.)
    """
    L, M = 32, 400
    g = _gen(7)
    a = torch.randn(M, L, L, generator=g, dtype=torch.float64)
    b = torch.randn(M, L, L, generator=g, dtype=torch.float64)
    frc = fourier_shell_correlation(a, b, 2)[:, 2 : L // 2]  # skip DC, shell 1 and Nyquist
    n = np.bincount(_numpy_shell_index(L, 2).ravel())[2 : L // 2]
    sigma = 1.0 / np.sqrt(n)
    mean, std = frc.mean(0).numpy(), frc.std(0).numpy()
    assert np.all(np.abs(mean) < 4.5 * sigma / np.sqrt(M))
    np.testing.assert_allclose(std, sigma, rtol=0.15)
    assert abs(float(np.mean(std / sigma)) - 1.0) < 0.04
    # 3D: the same law per shell.
    L3, M3 = 16, 200
    a3 = torch.randn(M3, L3, L3, L3, generator=g, dtype=torch.float64)
    b3 = torch.randn(M3, L3, L3, L3, generator=g, dtype=torch.float64)
    fsc = fourier_shell_correlation(a3, b3, 3)[:, 2 : L3 // 2]
    n3 = np.bincount(_numpy_shell_index(L3, 3).ravel())[2 : L3 // 2]
    ratio = fsc.std(0).numpy() * np.sqrt(n3)
    assert abs(float(ratio.mean()) - 1.0) < 0.07


@pytest.mark.parametrize("snr", [0.1, 1.0, 4.0])
def test_frc_of_signal_plus_noise_matches_closed_form(snr):
    """White signal of power snr, unit white noise: FRC(s + n1, s + n2) = snr / (1 + snr).

    Against the clean signal itself it is sqrt(snr / (1 + snr)). Monte Carlo over M images;
    a shell of n pixels has a spread of at most 1 / sqrt(n M) around the closed form.
    """
    L, M = 64, 128
    g = _gen(int(100 * snr))
    s = math.sqrt(snr) * torch.randn(M, L, L, generator=g, dtype=torch.float64)
    n1, n2 = torch.randn(2, M, L, L, generator=g, dtype=torch.float64)
    shells = slice(4, L // 2)
    tol = 4.0 / np.sqrt(np.bincount(_numpy_shell_index(L, 2).ravel())[shells] * M)
    expected = snr / (1 + snr)
    for a, b, value in [(s + n1, s + n2, expected), (s, s + n1, math.sqrt(expected))]:
        frc = fourier_shell_correlation(a, b, 2)[:, shells].mean(0).numpy()
        assert np.all(np.abs(frc - value) < tol), (frc, value)
        assert abs(float(frc.mean()) - value) < 0.01


def test_fsc_shell_k_is_frequency_k_over_L():
    """Negating every shell above kc: the FSC is 1 up to kc and -1 beyond, so the 0.5 crossing
    interpolates to kc + 1/4 and the resolution is L p / (kc + 1/4) Angstrom."""
    L, kc, p = 32, 6, 1.5
    x = torch.randn(L, L, L, generator=_gen(3), dtype=torch.float64)
    sign = torch.from_numpy(np.where(_numpy_shell_index(L, 3) <= kc, 1.0, -1.0))
    flipped = ifft3c(fft3c(x) * sign).real
    fsc = fourier_shell_correlation(x, flipped, 3)
    expected = torch.where(torch.arange(L // 2 + 1) <= kc, 1.0, -1.0).double()
    torch.testing.assert_close(fsc, expected, atol=1e-10, rtol=0)
    assert resolution_at(fsc, 0.5, L, p) == pytest.approx(L * p / (kc + 0.25))
    assert resolution_at(fsc, 0.0, L, p) == pytest.approx(L * p / (kc + 0.5))


# ----------------------------------------------------------------------------- resolution


def test_resolution_at_interpolates_the_first_crossing():
    L, p = 64, 1.25
    curve = torch.tensor([1.0, 0.98, 0.9, 0.7, 0.6, 0.3, 0.1, 0.6, 0.05] + [0.0] * 24)
    assert curve.numel() == L // 2 + 1
    # 0.5 is crossed between shells 4 (0.6) and 5 (0.3): k = 4 + 0.1 / 0.3; the later rebound
    # above 0.5 at shell 7 is ignored.
    k = 4 + (0.6 - 0.5) / (0.6 - 0.3)
    assert resolution_at(curve, 0.5, L, p) == pytest.approx(L * p / k)
    k143 = 5 + (0.3 - 0.143) / (0.3 - 0.1)
    assert resolution_at(curve, 0.143, L, p) == pytest.approx(L * p / k143)
    # A value exactly at the threshold is not below it: the crossing is at that shell.
    at = torch.tensor([1.0, 0.9, 0.5, 0.2] + [0.0] * 5)
    assert resolution_at(at, 0.5, 16, p) == pytest.approx(16 * p / 2.0)
    # Never below the threshold: Nyquist, 2 pixels.
    assert resolution_at(torch.full((L // 2 + 1,), 0.9), 0.5, L, p) == pytest.approx(2 * p)
    assert resolution_at(torch.full((17,), 0.9, dtype=torch.float64), 0.143, 33, 3.0) == 6.0


def test_fsc_is_zero_in_shells_without_power():
    L = 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(L, L, L, generator=g, dtype=torch.float64)
    band = fourier_resize(fourier_resize(x, 16, 3), L, 3)  # no power beyond shell 8
    curve = fourier_shell_correlation(band, band + 0.1 * torch.randn(L, L, L, generator=g, dtype=torch.float64), 3)
    assert torch.all(curve[15:] == 0)  # the cube corner of the band reaches shell 8 * sqrt(3)
    assert torch.all(curve[1:7] > 0.9)


def test_resolution_is_infinite_without_any_correlation():
    assert resolution_at(torch.tensor([0.2, 0.1, 0.0, 0.0]), 0.5, 6, 2.0) == math.inf
