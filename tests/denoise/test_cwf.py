"""Covariance Wiener filter: shrinker, moment estimators on Gaussian data, simulated sets."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from cryo_lightning.data.molecule_bank import MoleculeBank
from cryo_lightning.data.set_simulator import SetSimulator, SimulationConfig
from cryo_lightning.denoise.cwf import (
    PopulationPrior,
    ctf_groups,
    cwf_denoise,
    estimate_block_moments,
    shrink_eigenvalues,
)
from cryo_lightning.metrics import relative_mse
from cryo_lightning.physics.ctf import ctf_2d, random_ctf_params
from cryo_lightning.physics.steerable_basis import fourier_bessel_basis

HAVE_WIENER = importlib.util.find_spec("cryo_lightning.denoise.wiener") is not None


def test_shrinker_inverts_the_spiked_model_and_kills_the_noise_bulk():
    sigma2, gamma = 2.0, 0.25
    spikes = torch.tensor([[0.6, 1.5, 4.0, 20.0]], dtype=torch.float64)  # signal / sigma^2, above sqrt(gamma)
    ell = 1 + spikes
    sample = sigma2 * ell * (1 + gamma / (ell - 1))  # where a spike's sample eigenvalue lands (BBP)
    c2 = (1 - gamma / spikes**2) / (1 + gamma / spikes)
    out = shrink_eigenvalues(sample, torch.tensor([sigma2], dtype=torch.float64), gamma)
    torch.testing.assert_close(out, sigma2 * spikes * c2)
    edge = sigma2 * (1 + math.sqrt(gamma)) ** 2
    bulk = torch.tensor([[0.1, 1.0, edge * 0.999]], dtype=torch.float64)
    assert (shrink_eigenvalues(bulk, torch.tensor([sigma2], dtype=torch.float64), gamma) == 0).all()


def _gaussian_block(k: int, n: int, seed: int, with_ctf: bool, L: int = 24):
    """Coefficients ``y = H (mu + V g) + noise`` of one block, for a known mean and covariance."""
    basis = fourier_bessel_basis(L, dtype=torch.float64)
    Q = basis.block_sizes[k]
    g = torch.Generator().manual_seed(1000 + k)  # the truth is the same for every n and seed
    V = torch.complex(torch.randn(Q, 3, generator=g, dtype=torch.float64), torch.randn(Q, 3, generator=g, dtype=torch.float64))
    if k == 0:
        V = V.real.to(torch.complex128)
    V = V * torch.tensor([2.0, 1.2, 0.7], dtype=torch.float64) / math.sqrt(Q)
    C = V @ V.conj().T
    mu = torch.randn(Q, generator=g, dtype=torch.float64).to(torch.complex128) if k == 0 else torch.zeros(Q, dtype=torch.complex128)
    gd = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        if k == 0:
            return torch.randn(*shape, generator=gd, dtype=torch.float64).to(torch.complex128)
        return torch.complex(torch.randn(*shape, generator=gd, dtype=torch.float64),
                             torch.randn(*shape, generator=gd, dtype=torch.float64)) / math.sqrt(2)

    x = mu + normal(n, 3) @ V.T
    H = None
    if with_ctf:
        params = random_ctf_params(n, generator=gd, defocus_range=(8000.0, 25000.0))
        profiles = basis.radial_profile(ctf_2d(params, L, 5.0))
        H = basis.radial_operator(profiles, k)[None]
        x = (H[0].to(torch.complex128) @ x[..., None]).squeeze(-1)
    y = x + 0.5 * normal(n, Q)  # noise variance 0.25
    return y[None], H, mu, C, profiles[None] if with_ctf else None


@pytest.mark.parametrize("with_ctf", [False, True])
def test_moment_estimates_converge_on_gaussian_data(with_ctf):
    s2 = torch.tensor([0.25], dtype=torch.float64)
    for k in (0, 2):
        errors, mirrored_errors = [], []
        for n in (250, 1000, 4000):
            y, H, mu, C, _ = _gaussian_block(k, n, seed=n, with_ctf=with_ctf)
            mean, C_hat = estimate_block_moments(y, s2, H, with_mean=k == 0, shrinkage=False, reflection_invariant=False)
            errors.append(((C_hat[0] - C).norm() / C.norm()).item())
            if k == 0:
                assert (mean[0] - mu).norm() / mu.norm() < (0.2 if n == 250 else 0.1)
            else:
                assert mean is None
            # the shrunk estimate is PSD, Hermitian and also close
            _, C_shr = estimate_block_moments(y, s2, H, with_mean=k == 0, reflection_invariant=False)
            assert torch.linalg.eigvalsh(C_shr[0]).min() > -1e-12
            torch.testing.assert_close(C_shr[0], C_shr[0].conj().T)
            assert (C_shr[0] - C).norm() / C.norm() < 1.5 * errors[-1] + 0.05
            # with mirror symmetry imposed, the estimate is real and converges to Re(C)
            _, C_mir = estimate_block_moments(y, s2, H, with_mean=k == 0, shrinkage=False)
            assert C_mir.imag.abs().max() < 1e-12
            mirrored_errors.append(((C_mir[0] - C.real).norm() / C.real.norm()).item())
        # error ~ 1 / sqrt(n): a factor 16 in n should roughly quarter it
        for errs in (errors, mirrored_errors):
            assert errs[0] > errs[1] > errs[2]
            assert errs[2] < 0.5 * errs[0]
            assert errs[2] < 0.15


def test_ctf_grouping_is_a_small_perturbation():
    y, H, _, C, profiles = _gaussian_block(1, 600, seed=5, with_ctf=True)
    s2 = torch.tensor([0.25], dtype=torch.float64)
    _, exact = estimate_block_moments(y, s2, H, shrinkage=False, reflection_invariant=False)
    labels, G = ctf_groups(profiles, 16)
    assert G == 16 and labels.shape == (1, 600) and len(labels.unique()) > 8
    _, grouped = estimate_block_moments(y, s2, H, shrinkage=False, reflection_invariant=False, groups=(labels, G))
    # far below the estimate's own statistical error at this n
    assert (grouped - exact).norm() < min(0.1 * (exact[0] - C).norm(), 0.02 * C.norm())


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
