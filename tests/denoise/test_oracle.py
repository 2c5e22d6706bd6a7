"""Oracle posterior-mean denoiser: brute-force reference, high-SNR recovery, low-SNR ranking."""

from __future__ import annotations

import pytest
import torch

from cryo_lightning.data.molecule_bank import MoleculeBank
from cryo_lightning.data.set_simulator import SetSimulator, SimulationConfig
from cryo_lightning.denoise.oracle import fit_scale, oracle_denoise, posterior_weights, rotation_grid
from cryo_lightning.denoise.wiener import wiener_denoise
from cryo_lightning.metrics import relative_mse
from cryo_lightning.physics.ctf import ctf_2d, random_ctf_params
from cryo_lightning.physics.image_formation import clean_images
from cryo_lightning.physics.projection import volume_spectrum
from cryo_lightning.physics.rotations import geodesic_distance, random_rotations
from cryo_lightning.physics.volumes import random_molecule


def _simulate(L: int, N: int, snr: float, seed: int, B: int = 2) -> tuple[dict, torch.Tensor]:
    bank = MoleculeBank(L, "test", n_molecules=B, seed=0)
    sim = SetSimulator(bank, SimulationConfig(set_size=N, snr=(snr, snr), ctf=True, max_shift=0.0))
    batch = sim(torch.arange(B) + seed, torch.arange(B))
    return batch, bank.batch(range(B))


def test_rotation_grid_is_near_uniform():
    grid = rotation_grid(4096)
    assert abs(grid.shape[0] - 4096) < 0.02 * 4096
    torch.testing.assert_close(grid @ grid.transpose(1, 2), torch.eye(3).expand_as(grid), atol=1e-5, rtol=0)
    assert grid.mean(0).abs().max() < 1e-3  # the Haar mean of a rotation matrix is 0
    probes = random_rotations(500, generator=torch.Generator().manual_seed(1))
    nearest = geodesic_distance(probes[:, None], grid[None]).amin(1)
    # Covering radius: a cell of volume 8 pi^2 / M has edge ~15 degrees at M = 4096.
    assert nearest.max() < 13.0


@pytest.mark.parametrize("L", [16, 15])
def test_matches_brute_force_posterior_mean_with_shifts_and_chunks(L):
    g = torch.Generator().manual_seed(0)
    B, N, M, sigma2, scale = 2, 4, 40, 0.5, 0.3  # a spread posterior: max weights 0.05-0.6
    volumes = torch.stack([random_molecule(L, g) for _ in range(B)])
    spectrum = volume_spectrum(volumes, 2, "linear")
    grid = random_rotations(B * M, generator=g).reshape(B, M, 3, 3)
    ctf = ctf_2d(random_ctf_params((B, N), generator=g), L, 5.0)
    origins = 2 * torch.rand(B, N, 2, generator=g) - 1
    truth = clean_images(spectrum, grid[:, :N], ctf, origins) * scale
    noisy = truth + sigma2**0.5 * torch.randn(B, N, L, L, generator=g)

    # Reference: every hypothesis rendered in real space, float64 softmax of -||y - x||^2 / 2 sigma^2.
    hyp = torch.stack([
        clean_images(spectrum, grid[:, m, None].expand(B, N, 3, 3), ctf, origins) * scale for m in range(M)
    ], dim=2).double()  # (B, N, M, L, L)
    logw = -(noisy.double()[:, :, None] - hyp).square().sum((-2, -1)) / (2 * sigma2)
    w_ref = torch.softmax(logw, dim=-1)
    mean_ref = (w_ref[..., None, None] * hyp).sum(2)

    w = posterior_weights(noisy, ctf, torch.full((B,), sigma2), spectrum, grid, scale=scale, origins=origins)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, N))
    torch.testing.assert_close(w.double(), w_ref, atol=1e-4, rtol=0)
    out = oracle_denoise(noisy, ctf, torch.full((B,), sigma2), spectrum, scale=scale, rotations=grid,
                         origins=origins, chunk=7, return_details=True)
    torch.testing.assert_close(out.denoised.double(), mean_ref, atol=1e-4 * float(mean_ref.abs().max()), rtol=0)
    best = torch.gather(grid, 1, w_ref.argmax(-1)[..., None, None].expand(B, N, 3, 3))
    torch.testing.assert_close(out.best_rotation, best)
    torch.testing.assert_close(out.max_weight.double(), w_ref.amax(-1), atol=1e-4, rtol=0)


def test_high_snr_recovers_the_clean_images_and_rotations():
    batch, volumes = _simulate(L=20, N=8, snr=10.0, seed=5)
    B, N = batch["noisy"].shape[:2]
    extra = random_rotations(B * 300, generator=torch.Generator().manual_seed(2)).reshape(B, 300, 3, 3)
    grid = torch.cat([extra[:, :150], batch["rotations"], extra[:, 150:]], dim=1)
    out = oracle_denoise(batch["noisy"], batch["ctf"], batch["noise_variance"], volumes,
                         rotations=grid, chunk=128, return_details=True)  # scale: moment estimate
    exact = fit_scale(batch["clean"], volumes, batch["rotations"], batch["ctf"])
    # The moment estimate uses the grid's mean projection power in place of the 8 true views'.
    torch.testing.assert_close(out.scale, exact, rtol=0.1, atol=0)
    assert relative_mse(out.denoised, batch["clean"]).max() < 0.05
    assert geodesic_distance(out.best_rotation, batch["rotations"]).max() < 1e-3
    assert out.max_weight.median() > 0.99


def test_low_snr_beats_wiener_and_noisy_input():
    batch, volumes = _simulate(L=24, N=32, snr=1 / 32, seed=11)
    args = batch["noisy"], batch["ctf"], batch["noise_variance"]
    scale = fit_scale(batch["clean"], volumes, batch["rotations"], batch["ctf"])
    oracle = relative_mse(oracle_denoise(*args, volumes, scale=scale, n_rotations=4096), batch["clean"]).mean()
    wiener = relative_mse(wiener_denoise(*args), batch["clean"]).mean()
    noisy = relative_mse(batch["noisy"], batch["clean"]).mean()
    assert oracle < 0.6 * wiener
    assert wiener < noisy


def test_shared_grid_scalar_arguments_and_shapes():
    batch, volumes = _simulate(L=16, N=3, snr=1.0, seed=1, B=2)
    out = oracle_denoise(batch["noisy"], batch["ctf"], 1.0, volumes, scale=None, n_rotations=300)
    assert out.shape == batch["noisy"].shape and out.dtype == torch.float32
    with pytest.raises(ValueError):
        rotation_grid(10, kind="healpix")
