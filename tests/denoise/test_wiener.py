"""Radial CTF-aware Wiener filter: spectrum estimate, closed-form MMSE, simulated sets."""

from __future__ import annotations

import pytest
import torch

from cryo_lightning.data.molecule_bank import MoleculeBank
from cryo_lightning.data.set_simulator import SetSimulator, SimulationConfig
from cryo_lightning.denoise.wiener import estimate_radial_spectrum, wiener_denoise
from cryo_lightning.metrics import relative_mse
from cryo_lightning.physics.ctf import ctf_2d, random_ctf_params
from cryo_lightning.physics.fourier import fft2c, ifft2c, radial_grid

L = 32


def _spectrum_grid() -> torch.Tensor:
    """Per-pixel-variance spectrum ``P(k)``: a field with ``E|DFT|^2 = L^2 P(k)``, radial, decaying."""
    r = radial_grid(L, 2)
    return 4.0 * torch.exp(-((r / 6.0) ** 2)) + 0.05


def _gaussian_field(n: int, generator: torch.Generator) -> torch.Tensor:
    # sqrt(P) is even under k -> -k on the centred grid, so the field is real.
    white = torch.randn(n, L, L, generator=generator)
    return ifft2c(_spectrum_grid().sqrt() * fft2c(white)).real


def _ctfs(n: int, generator: torch.Generator) -> torch.Tensor:
    return ctf_2d(random_ctf_params(n, generator=generator, defocus_range=(8000.0, 20000.0)), L, 3.0)


def test_pure_noise_is_filtered_to_almost_nothing():
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 64, L, L, generator=g)
    ctf = _ctfs(128, g).reshape(2, 64, L, L)
    out = wiener_denoise(noisy, ctf, torch.ones(2))
    assert out.shape == noisy.shape
    assert out.square().sum() / noisy.square().sum() < 0.005


@pytest.mark.parametrize("with_ctf", [False, True])
def test_spectrum_estimate_and_mse_match_closed_form(with_ctf):
    g = torch.Generator().manual_seed(1)
    n, sigma2 = 512, 2.0
    ctf = _ctfs(n, g) if with_ctf else torch.ones(n, L, L)
    target = ifft2c(ctf * fft2c(_gaussian_field(n, g))).real
    noisy = target + sigma2**0.5 * torch.randn(n, L, L, generator=g)

    spectrum = estimate_radial_spectrum(noisy[None], ctf[None], torch.tensor([sigma2]))[0]
    true = L * L * _spectrum_grid()[L // 2, L // 2 :]  # along +x: shell r at column L//2 + r
    # With a CTF the innermost shells are barely sampled (C(0) = amplitude contrast = 0.1).
    first = 2 if with_ctf else 0
    torch.testing.assert_close(spectrum[first : L // 2], true[first:], rtol=0.15, atol=0.02 * float(true[0]))

    estimate = wiener_denoise(noisy[None], ctf[None], torch.tensor([sigma2]))[0]
    # Per frequency, the MMSE of C X from C X + N is C^2 P sigma^2 / (C^2 P + sigma^2).
    signal = ctf.square() * _spectrum_grid()
    mmse = (signal * sigma2 / (signal + sigma2)).sum() / signal.sum()
    measured = (estimate - target).square().sum() / target.square().sum()
    assert measured == pytest.approx(float(mmse), rel=0.04)
    assert measured >= 0.99 * mmse  # no linear filter beats the MMSE (up to Monte Carlo error)


def test_beats_noisy_input_on_simulated_sets():
    bank = MoleculeBank(L, "test", n_molecules=2, seed=0)
    sim = SetSimulator(bank, SimulationConfig(set_size=32, snr=(1 / 8, 1 / 8), ctf=True, pixel_size=4.0))
    batch = sim(torch.tensor([3, 4]), torch.tensor([0, 1]))
    estimate = wiener_denoise(batch["noisy"], batch["ctf"], batch["noise_variance"])
    noisy_mse = relative_mse(batch["noisy"], batch["clean"]).mean()
    wiener_mse = relative_mse(estimate, batch["clean"]).mean()
    assert wiener_mse < 0.1 * noisy_mse
    assert wiener_mse < 0.8  # much better than the zero image, too
