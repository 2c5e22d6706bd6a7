"""Covariance Wiener filter: simulated sets with and without CTF, sets denoised independently."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from cryo_lightning.data.molecule_bank import MoleculeBank
from cryo_lightning.data.set_simulator import SetSimulator, SimulationConfig
from cryo_lightning.denoise.cwf import cwf_denoise
from cryo_lightning.metrics import relative_mse
from cryo_lightning.physics.ctf import ctf_2d, random_ctf_params

HAVE_WIENER = importlib.util.find_spec("cryo_lightning.denoise.wiener") is not None


def _simulate(n: int, snr: float, ctf: bool, L: int = 32) -> dict:
    bank = MoleculeBank(L, "test", n_molecules=1, seed=0)
    config = SimulationConfig(set_size=n, ctf=ctf, max_shift=0, snr=(snr, snr), pixel_size=8.0)
    return SetSimulator(bank, config)(torch.tensor([11]), torch.tensor([0]))


@pytest.mark.parametrize("snr", [1 / 4, 1 / 16])
def test_cwf_denoises_ctf_free_projections(snr):
    batch = _simulate(1000, snr, ctf=False)
    out = cwf_denoise(batch["noisy"], batch["ctf"], batch["noise_variance"])
    assert out.shape == batch["noisy"].shape and out.dtype == torch.float32
    err = relative_mse(out, batch["clean"]).mean()
    noisy = relative_mse(batch["noisy"], batch["clean"]).mean()
    assert err < 0.03 * noisy
    assert err < (0.06 if snr > 0.1 else 0.11)
    if HAVE_WIENER:
        from cryo_lightning.denoise.wiener import wiener_denoise

        assert err < 0.5 * relative_mse(wiener_denoise(batch["noisy"], batch["ctf"], batch["noise_variance"]), batch["clean"]).mean()
    # no CTF given is the same as a CTF of ones
    torch.testing.assert_close(cwf_denoise(batch["noisy"], None, batch["noise_variance"]), out)


def test_cwf_with_ctf():
    batch = _simulate(1000, 1 / 16, ctf=True)
    out = cwf_denoise(batch["noisy"], batch["ctf"], batch["noise_variance"])
    err = relative_mse(out, batch["clean"]).mean()
    assert err < 0.03 * relative_mse(batch["noisy"], batch["clean"]).mean()
    assert err < 0.35
    if HAVE_WIENER:
        from cryo_lightning.denoise.wiener import wiener_denoise

        assert err < 0.5 * relative_mse(wiener_denoise(batch["noisy"], batch["ctf"], batch["noise_variance"]), batch["clean"]).mean()


def test_sets_are_denoised_independently():
    g = torch.Generator().manual_seed(0)
    L, N = 16, 48
    noisy = torch.randn(2, N, L, L, generator=g) + torch.exp(-torch.linspace(-2, 2, L) ** 2)[None, None, :, None]
    ctf = ctf_2d(random_ctf_params(2 * N, generator=g), L, 6.0).reshape(2, N, L, L)
    s2 = torch.tensor([1.0, 0.5])
    both = cwf_denoise(noisy, ctf, s2)
    for b in range(2):
        torch.testing.assert_close(both[b : b + 1], cwf_denoise(noisy[b : b + 1], ctf[b : b + 1], s2[b : b + 1]), atol=1e-5, rtol=1e-4)
