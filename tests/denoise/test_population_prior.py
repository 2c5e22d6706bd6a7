"""CWF population prior: per-unit-power statistics, molecule weights, and its effect on small sets."""

from __future__ import annotations

import pytest
import torch

from cryo_lightning.data.molecule_bank import MoleculeBank
from cryo_lightning.data.set_simulator import SetSimulator, SimulationConfig
from cryo_lightning.denoise.block_moments import estimate_block_moments
from cryo_lightning.denoise.cwf import cwf_denoise
from cryo_lightning.denoise.population_prior import PopulationPrior
from cryo_lightning.metrics import relative_mse
from cryo_lightning.physics.steerable_basis import fourier_bessel_basis


def _simulate(n: int, snr: float, ctf: bool, L: int = 32) -> dict:
    bank = MoleculeBank(L, "test", n_molecules=1, seed=0)
    config = SimulationConfig(set_size=n, ctf=ctf, max_shift=0, snr=(snr, snr), pixel_size=8.0)
    return SetSimulator(bank, config)(torch.tensor([11]), torch.tensor([0]))


def _clean_sets(split: str, molecules: int, n: int, ctf: bool, seed: int = 100, L: int = 32) -> dict:
    """One noise-free set of ``n`` images per molecule of a bank (``clean`` is ``(molecules, n, L, L)``)."""
    bank = MoleculeBank(L, split, n_molecules=molecules, seed=0)
    sim = SetSimulator(bank, SimulationConfig(set_size=n, ctf=ctf, pixel_size=8.0))
    return sim(torch.arange(molecules) + seed, torch.arange(molecules))


def test_population_prior_is_per_unit_power_and_sees_through_the_ctf():
    basis = fourier_bessel_basis(32)
    free = _clean_sets("train", 3, 512, ctf=False)["clean"]
    prior = PopulationPrior.fit(((free[m], None) for m in range(3)), basis)
    assert len(prior) == 3
    for m in range(3):  # unit power: |mu|^2 + sum_k tr C_k = 1
        total = prior.means[m].square().sum() + sum(torch.diagonal(c[m]).sum() for c in prior.covariances)
        assert abs(float(total) - 1) < 1e-9
    for c in prior.covariances:
        torch.testing.assert_close(c, c.transpose(1, 2))
        assert float(torch.linalg.eigvalsh(c).min()) > -1e-12
    # scale-free, and a flat buffer round-trips
    scaled = PopulationPrior.fit(((3 * free[m], None) for m in range(3)), basis)
    torch.testing.assert_close(scaled.flatten(), prior.flatten())
    torch.testing.assert_close(PopulationPrior.unflatten(prior.flatten(), basis).flatten(), prior.flatten())
    with pytest.raises(ValueError, match="L = 32"):
        PopulationPrior.unflatten(prior.flatten()[:, :-1], basis)
    # from CTF-affected images of other poses, least squares through the CTFs recovers the statistics
    with_ctf = _clean_sets("train", 1, 512, ctf=True, seed=200)
    through = PopulationPrior.fit([(with_ctf["clean"][0], with_ctf["ctf"][0])], basis)
    direct = PopulationPrior(prior.means[:1], [c[:1] for c in prior.covariances])
    diff = (through.flatten() - direct.flatten()).norm() / direct.flatten().norm()
    assert diff < 0.03, diff  # 0.004 measured (the poses differ)


def test_population_prior_weights_pick_the_molecule_a_set_comes_from():
    basis = fourier_bessel_basis(32)
    free = _clean_sets("train", 4, 256, ctf=False)["clean"]
    prior = PopulationPrior.fit(((free[m], None) for m in range(4)), basis)
    noisy = _clean_sets("train", 4, 64, ctf=True, seed=300)  # other poses and CTFs
    batch = {k: noisy[k] for k in ("clean", "ctf")}
    y = basis.expand(batch["clean"] + torch.randn(batch["clean"].shape, generator=torch.Generator().manual_seed(0)))
    profiles = basis.radial_profile(batch["ctf"])
    blocks = basis.split(y)
    operators = [basis.radial_operator(profiles, k) for k in range(len(blocks))]
    s2 = torch.ones(4, dtype=torch.float64)
    moments = [estimate_block_moments(b, s2, H, with_mean=k == 0) for k, (b, H) in enumerate(zip(blocks, operators))]
    power = moments[0][0].abs().square().sum(-1) + sum(torch.diagonal(C, dim1=-2, dim2=-1).real.sum(-1) for _, C in moments)
    loglik = prior.log_likelihoods(blocks, operators, s2, power)
    assert loglik.shape == (4, 4)
    assert loglik.argmax(-1).tolist() == [0, 1, 2, 3]


def test_population_prior_helps_small_sets_and_vanishes_at_zero_strength():
    """Fitted to other molecules, the prior lowers the error of a small set; nu = 0 is the classical CWF."""
    basis = fourier_bessel_basis(32)
    free = _clean_sets("train", 8, 256, ctf=False)["clean"]
    prior = PopulationPrior.fit(((free[m], None) for m in range(8)), basis)
    batch = _simulate(24, 1 / 32, ctf=True)
    args = (batch["noisy"], batch["ctf"], batch["noise_variance"])
    classical = cwf_denoise(*args)
    torch.testing.assert_close(cwf_denoise(*args, prior=prior, prior_strength=0.0), classical)
    errors = [float(relative_mse(x, batch["clean"]).mean()) for x in (
        classical,
        cwf_denoise(*args, prior=prior, prior_strength=64.0),
        cwf_denoise(*args, prior=prior, prior_strength=64.0, prior_tempering=0.1),
    )]
    assert errors[1] < 0.9 * errors[0], errors
    assert errors[2] < errors[0], errors
