"""Image moment estimation (abinitio/image_moments.py): streaming, CTF groups, noise debiasing."""

from __future__ import annotations

import pytest
import torch

from cryo_lightning.abinitio.image_moments import MomentEstimator, MomentLayout, estimate_moments, group_by_defocus
from cryo_lightning.abinitio.moment_simulation import MomentSimulator
from cryo_lightning.physics.ctf import random_ctf_params
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.noise import add_white_noise
from cryo_lightning.physics.viewing_sh import SHViewingDistribution
from cryo_lightning.physics.volumes import random_molecule


def _relative(x: list[torch.Tensor], y: list[torch.Tensor]) -> float:
    num = sum(float((a - b).abs().pow(2).sum()) for a, b in zip(x, y))
    return (num / sum(float(b.abs().pow(2).sum()) for b in y)) ** 0.5


def test_layout_truncation():
    layout = MomentLayout(32, 6, bandlimit=0.25)
    full = MomentLayout(32, 6)
    assert len(layout.block_sizes) == 7
    assert all(q <= p for q, p in zip(layout.block_sizes, full.block_sizes))
    assert layout.count == sum(layout.block_sizes) == layout.index.numel()
    assert [int((layout.angular_index == k).sum()) for k in range(7)] == layout.block_sizes


def test_streaming_equals_one_shot_and_groups_are_separate():
    g = torch.Generator().manual_seed(0)
    layout = MomentLayout(16, 3)
    images = torch.randn(300, 16, 16, generator=g, dtype=torch.float64)
    groups = torch.randint(0, 3, (300,), generator=g)
    one = estimate_moments(images, layout, groups=groups, noise_variance=0.5)
    est = MomentEstimator(layout, 3)
    for s in range(0, 300, 70):
        est.update(images[s : s + 70], groups[s : s + 70], torch.full((len(images[s : s + 70]),), 0.5))
    streamed = est.result()
    torch.testing.assert_close(one.m1, streamed.m1)
    for a, b in zip(one.m2, streamed.m2):
        torch.testing.assert_close(a, b)
    # group 1 alone, computed directly
    c = layout.expand(images[groups == 1])
    torch.testing.assert_close(one.m1[1], c.mean(0))
    c1 = layout.split(c)[1]
    eye = torch.eye(c1.shape[-1], dtype=c1.dtype)
    torch.testing.assert_close(one.m2[1][1], c1.T @ c1.conj() / c1.shape[0] - 0.5 * eye)
    assert one.counts.tolist() == [float((groups == k).sum()) for k in range(3)]
    torch.testing.assert_close(one.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_empty_group_is_an_error():
    est = MomentEstimator(MomentLayout(16, 2), 2)
    est.update(torch.zeros(4, 16, 16), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="no image"):
        est.result()
    with pytest.raises(ValueError, match="group indices"):
        est.update(torch.zeros(1, 16, 16), torch.tensor([5]))


def test_white_noise_has_identity_covariance_in_every_block():
    """Debiasing pure noise leaves ~0: E[c_k c_k^H] = sigma^2 I exactly (grid-orthonormal radial functions)."""
    g = torch.Generator().manual_seed(1)
    layout = MomentLayout(16, 4)
    sigma2 = 2.0
    noise = torch.randn(20_000, 16, 16, generator=g, dtype=torch.float64) * sigma2**0.5
    m = estimate_moments(noise, layout, noise_variance=sigma2)
    for block, q in zip(m.m2, layout.block_sizes):
        # entries of the mean of 20,000 outer products: standard error sigma^2 / sqrt(N) ~ 0.014
        assert float(block.abs().max()) < 6 * sigma2 / 20_000**0.5
    assert float(m.m1.abs().max()) < 6 * (sigma2 / 20_000) ** 0.5


def _clean_projections(seed: int, n: int, L: int = 16, l_max: int = 3):
    """``(layout, clean (n, L, L), generator)``: projections of a random molecule, degree-4 views."""
    g = torch.Generator().manual_seed(seed)
    basis = SphericalFourierBesselBasis(L, l_max=l_max)
    layout = MomentLayout(L, l_max)
    a = basis.expand(random_molecule(L, g, dtype=torch.float64))
    dist = SHViewingDistribution.random(4, generator=g)
    clean = next(MomentSimulator(basis, layout, chunk=n).images(a, dist, n, g))[0]
    return layout, clean, g


def test_debiased_second_moment_converges_at_snr_one_tenth():
    """At SNR 1/10 the debiased M2 approaches the clean images' M2 as N grows; the raw one does not."""
    layout, clean, g = _clean_projections(2, 16_000)
    truth = estimate_moments(clean, layout).m2  # clean-image moments of the same poses
    noisy, sigma2 = add_white_noise(clean, 0.1, generator=g, dim=(-3,))
    errors, raw = [], []
    for n in (1_000, 16_000):
        errors.append(_relative(estimate_moments(noisy[:n], layout, noise_variance=float(sigma2)).m2,
                                estimate_moments(clean[:n], layout).m2))
        raw.append(_relative(estimate_moments(noisy[:n], layout).m2, truth))
    assert errors[1] < errors[0] / 2.5  # ~ 1 / sqrt(16) = 1/4 expected
    assert errors[1] < 0.1
    assert raw[1] > 5 * errors[1]  # without debiasing the noise term dominates


def test_group_by_defocus():
    g = torch.Generator().manual_seed(3)
    params = random_ctf_params(1000, generator=g)
    groups, rep = group_by_defocus(params, 4)
    assert torch.bincount(groups).tolist() == [250] * 4
    mean_defocus = 0.5 * (params.defocus_u + params.defocus_v)
    for k in range(4):
        sel = groups == k
        assert float(rep.defocus_u[k]) == pytest.approx(float(mean_defocus[sel].mean()), rel=1e-5)
        assert float(rep.defocus_v[k]) == float(rep.defocus_u[k])
    assert bool((rep.defocus_u[1:] > rep.defocus_u[:-1]).all())
    assert float(mean_defocus[groups == 0].max()) <= float(mean_defocus[groups == 1].min())


def test_third_moment_slice_debiasing_removes_every_noise_term():
    """A fixed image plus white noise: the debiased slice equals the clean c_0t c_k c_k^H (all three bias terms)."""
    g = torch.Generator().manual_seed(4)
    L, n, sigma2 = 16, 40_000, 1.0
    layout = MomentLayout(L, 3)
    y, x = torch.meshgrid(torch.arange(L) - L / 2, torch.arange(L) - L / 2, indexing="ij")
    image = (1.0 * torch.exp(-(x**2 + y**2) / 8.0) + 0.5 * torch.exp(-((x - 3) ** 2 + (y + 1) ** 2) / 4.0)).double()
    noisy = image + torch.randn(n, L, L, generator=g, dtype=torch.float64) * sigma2**0.5
    m = estimate_moments(noisy, layout, noise_variance=sigma2, third=True)
    raw = estimate_moments(noisy, layout, third=True)
    c = layout.expand(image[None])[0]
    q0 = layout.block_sizes[0]
    for k, (ck, block, raw_block) in enumerate(zip(layout.split(c), m.m3, raw.m3)):
        clean = torch.einsum("t,q,r->tqr", c[:q0], ck, ck.conj())
        error = float((block[0] - clean).norm())
        bias = float((raw_block[0] - clean).norm())  # sigma^2 (m_t I + ...): many standard errors
        assert error < 0.1 * bias, (k, error, bias)


def test_debiased_third_moment_converges_at_snr_one_half():
    """Projections of a molecule at SNR 1/2: the debiased slice approaches the clean one as N grows."""
    layout, clean, g = _clean_projections(5, 32_000)
    noisy, sigma2 = add_white_noise(clean, 0.5, generator=g, dim=(-3,))
    errors = []
    for n in (2_000, 32_000):
        errors.append(_relative(estimate_moments(noisy[:n], layout, noise_variance=float(sigma2), third=True).m3,
                                estimate_moments(clean[:n], layout, third=True).m3))
    raw = _relative(estimate_moments(noisy, layout, third=True).m3, estimate_moments(clean, layout, third=True).m3)
    assert errors[1] < errors[0] / 2.5  # ~ 1 / 4 expected
    assert raw > 3 * errors[1]


def test_sampling_errors_match_monte_carlo():
    """The reported E||M_hat - M||^2 of M1, each M2_k and each M3_k matches the spread of 40 disjoint estimates."""
    reps, n = 40, 250
    layout, clean, g = _clean_projections(7, reps * n)
    noisy, sigma2 = add_white_noise(clean, 0.5, generator=g, dim=(-3,))
    pooled = estimate_moments(noisy, layout, noise_variance=float(sigma2), third=True)
    parts = [estimate_moments(noisy[i * n:(i + 1) * n], layout, noise_variance=float(sigma2), third=True)
             for i in range(reps)]

    def sq(x: torch.Tensor) -> float:
        return float(x.abs().pow(2).sum())

    shrink = 1 - 1 / reps  # the pooled estimate shares 1/reps of each part's error
    observed = sum(sq(p.m1 - pooled.m1) for p in parts) / reps / shrink
    reported = sum(float(p.m1_error.sum()) for p in parts) / reps
    assert abs(observed / reported - 1) < 0.15, (observed, reported)
    for k in range(len(layout.block_sizes)):
        for name in ("m2", "m3"):
            observed = sum(sq(getattr(p, name)[k] - getattr(pooled, name)[k]) for p in parts) / reps / shrink
            reported = sum(float(getattr(p, f"{name}_error")[0, k]) for p in parts) / reps
            assert abs(observed / reported - 1) < 0.15, (name, k, observed, reported)
    # the error falls as 1 / N
    assert float(pooled.m2_error.sum()) < float(parts[0].m2_error.sum()) / (0.8 * reps)


def test_moment_discrepancy_of_scaled_images_is_the_closed_form():
    # Images scaled by s have moments s M1, s^2 M2, s^3 M3 (no noise to debias), so the relative
    # differences are (1 - s)^2, (1 - s^2)^2 and (1 - s^3)^2 exactly.
    from cryo_lightning.abinitio.image_moments import moment_discrepancy

    g = torch.Generator().manual_seed(0)
    images = torch.randn(40, 16, 16, generator=g, dtype=torch.float64) + 0.3
    layout = MomentLayout(16, 2)
    groups = torch.arange(40) % 2
    ref = estimate_moments(images, layout, groups=groups, third=True)
    s = 0.5
    est = estimate_moments(s * images, layout, groups=groups, third=True)
    want = (1 - s) ** 2 + (1 - s**2) ** 2
    torch.testing.assert_close(float(moment_discrepancy(est, ref)), want, rtol=1e-10, atol=0)
    torch.testing.assert_close(float(moment_discrepancy(est, ref, third=True)), want + (1 - s**3) ** 2,
                               rtol=1e-10, atol=0)
    assert float(moment_discrepancy(ref, ref, third=True)) == 0.0
