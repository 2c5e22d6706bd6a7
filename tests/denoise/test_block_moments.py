"""Moments of a CWF block: the eigenvalue shrinker, the estimators on Gaussian data, CTF grouping."""

from __future__ import annotations

import math

import pytest
import torch

from cryo_lightning.denoise.block_moments import estimate_block_moments, shrink_eigenvalues
from cryo_lightning.denoise.ctf_groups import ctf_groups
from cryo_lightning.physics.ctf import ctf_2d, random_ctf_params
from cryo_lightning.physics.steerable_basis import fourier_bessel_basis


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
