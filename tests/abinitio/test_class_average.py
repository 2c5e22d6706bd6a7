"""Class averaging: invariant features, neighbours, alignment conventions, CTF-aware averages."""

from __future__ import annotations

import math

import pytest
import torch

from cryo_lightning.abinitio.class_average import (
    align,
    align_coefficients,
    aligned_average,
    class_averages,
    nearest_neighbors,
    rotation_invariant_features,
    select_centres,
    steerable_coefficients,
)
from cryo_lightning.metrics import relative_mse
from cryo_lightning.physics.ctf import ctf_2d, random_ctf_params
from cryo_lightning.physics.fourier import ifft2c
from cryo_lightning.physics.projection import project_spectrum, translate_spectrum, volume_spectrum
from cryo_lightning.physics.rotations import euler_to_matrix, matrix_to_euler, random_rotations, viewing_direction
from cryo_lightning.physics.steerable_basis import fourier_bessel_basis
from cryo_lightning.physics.volumes import random_molecule


@pytest.fixture(scope="module")
def molecule_32():
    return volume_spectrum(random_molecule(32, torch.Generator().manual_seed(3)))


@pytest.fixture(scope="module")
def molecule_48():
    return volume_spectrum(random_molecule(48, torch.Generator().manual_seed(3)))


def _copies(spectrum, psi_deg: torch.Tensor, shifts: torch.Tensor | None = None, ctf: torch.Tensor | None = None):
    """Projections of one view (rot 40, tilt 70) at in-plane angles ``psi_deg``, optionally shifted
    (pixels, ``(x, y)``) and CTF-affected. Raising psi by ``d`` rotates the image by ``-d`` (RELION's
    ``A = Rz(-psi) ...``), so the alignment angle that brings copy ``j`` back onto copy 0 is
    ``psi_j - psi_0``."""
    euler = torch.stack([torch.full_like(psi_deg, 40.0), torch.full_like(psi_deg, 70.0), psi_deg], dim=-1)
    spec = project_spectrum(spectrum, euler_to_matrix(euler))
    if ctf is not None:
        spec = spec * ctf
    if shifts is not None:
        spec = translate_spectrum(spec, shifts)
    return ifft2c(spec).real


def _angle_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = torch.remainder(a - b, 2 * math.pi)
    return torch.minimum(d, 2 * math.pi - d)


# ------------------------------------------------------------------------------------ conventions
def test_average_rotates_counter_clockwise_and_shifts_like_translate_spectrum():
    L = 33  # odd: a quarter turn maps the whole frequency grid onto itself, so it is exact
    img = torch.randn(1, L, L, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    quarter = aligned_average(img[None], torch.full((1, 1), math.pi / 2, dtype=torch.float64),
                              torch.zeros(1, 1, 2, dtype=torch.float64))[0]
    # rotate(I, a)(r) = I(R_{-a} r): for a = 90 degrees, I'(x, y) = I(y, -x), pixel [y, x] <- [c - x, c + y]
    c = L // 2
    idx = torch.arange(L) - c
    expected = img[0][(c - idx)[None, :], (c + idx)[:, None]]
    torch.testing.assert_close(quarter, expected)
    moved = aligned_average(img[None], torch.zeros(1, 1, dtype=torch.float64),
                            torch.tensor([[[2.0, -1.0]]], dtype=torch.float64))[0]
    torch.testing.assert_close(moved, torch.roll(img[0], shifts=(-1, 2), dims=(-2, -1)))
    # the steerable basis uses the same sense of rotation
    basis = fourier_bessel_basis(L, dtype=torch.float64)
    torch.testing.assert_close(basis.evaluate(basis.rotate(basis.expand(img), math.pi / 2)),
                               basis.evaluate(basis.expand(quarter[None])), atol=1e-9, rtol=0)


def test_plain_average_with_no_ctf_and_no_wiener_term_is_the_mean():
    x = torch.randn(2, 5, 16, 16, generator=torch.Generator().manual_seed(1))
    avg = aligned_average(x, torch.zeros(2, 5), torch.zeros(2, 5, 2))
    torch.testing.assert_close(avg, x.mean(1), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- features, kNN
def test_features_are_invariant_to_in_plane_rotation_and_tell_mirrors_apart(molecule_32):
    n = 60
    rotations = random_rotations(n, generator=torch.Generator().manual_seed(4))
    euler = matrix_to_euler(rotations)
    turned = euler.clone()
    turned[:, 2] += 360 * torch.rand(n, generator=torch.Generator().manual_seed(5))
    images = ifft2c(project_spectrum(molecule_32, rotations)).real
    rotated = ifft2c(project_spectrum(molecule_32, euler_to_matrix(turned))).real
    # One set, so both halves share the steerable PCA and the feature PCA.
    f = rotation_invariant_features(torch.cat([images, rotated]), noise_variance=0.0)
    cosine = (f[:n] * f[n:]).sum(-1)
    assert float(cosine.min()) > 0.98, cosine.min()
    neighbors, _ = nearest_neighbors(f, 2)
    assert torch.equal(neighbors[:n, 1], torch.arange(n) + n)
    # A mirrored projection (the view from the opposite side) is a different class.
    f = rotation_invariant_features(torch.cat([images, images.flip(-1)]), noise_variance=0.0)
    assert float((f[:n] * f[n:]).sum(-1).abs().max()) < 0.5


def test_neighbours_of_projections_have_close_viewing_directions(molecule_32):
    n, k = 500, 6
    rotations = random_rotations(n, generator=torch.Generator().manual_seed(6))
    images = ifft2c(project_spectrum(molecule_32, rotations)).real
    neighbors, similarity = nearest_neighbors(rotation_invariant_features(images, noise_variance=0.0), k)
    assert torch.equal(neighbors[:, 0], torch.arange(n))
    assert bool((similarity[:, 1:-1] >= similarity[:, 2:]).all())
    d = viewing_direction(rotations)
    angle = torch.rad2deg(torch.acos((d[neighbors[:, 1:]] * d[:, None]).sum(-1).clamp(-1, 1)))
    # The k - 1 closest of 500 uniform directions are ~8 degrees away (median) and ~13 (90%).
    ideal = torch.rad2deg(torch.acos((d @ d.T).topk(k, dim=1).values[:, 1:].clamp(-1, 1)))
    assert float(angle.median()) < float(ideal.median()) + 2.0, (angle.median(), ideal.median())
    assert float(angle.quantile(0.9)) < float(ideal.quantile(0.9)) + 4.0
    # Rare outliers are near-mirror views (a projection and its mirror look alike).
    assert float((angle > 30).float().mean()) < 0.01


def test_nearest_neighbors_matches_brute_force_and_puts_self_first():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(50, 8, generator=g)
    f[7] = f[3]  # an exact duplicate must not displace the image itself
    idx, sim = nearest_neighbors(f, 4, chunk=16)
    unit = f / f.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    assert torch.equal(idx[:, 0], torch.arange(50))
    for i in range(50):
        others = torch.cat([torch.arange(i), torch.arange(i + 1, 50)])
        expected = others[torch.argsort(cos[i, others], descending=True)[:3]]
        assert set(idx[i, 1:].tolist()) == set(expected.tolist())
        torch.testing.assert_close(sim[i], cos[i, idx[i]])
    assert int(idx[3, 1]) == 7 and int(idx[7, 1]) == 3


def test_selected_centres_do_not_belong_to_each_others_classes():
    g = torch.Generator().manual_seed(3)
    idx, sim = nearest_neighbors(torch.randn(200, 6, generator=g), 5)
    centres = select_centres(idx, sim, 12)
    assert len(set(centres.tolist())) == 12
    for a in range(12):
        for b in range(a):
            assert int(centres[a]) not in idx[centres[b]].tolist()


# -------------------------------------------------------------------------------------- alignment
def test_align_recovers_known_rotation_and_shift(molecule_48):
    g = torch.Generator().manual_seed(8)
    psi = torch.cat([torch.zeros(1), 360 * torch.rand(6, generator=g)])
    shifts = torch.cat([torch.zeros(1, 2), 2.5 * (2 * torch.rand(6, 2, generator=g) - 1)])
    images = _copies(molecule_48, psi, shifts)
    angles, found, scores = align(images[0], images[1:], n_angles=360, max_shift=3.0, shift_step=1.0)
    delta = torch.deg2rad(psi[1:])
    assert float(_angle_error(angles, delta).max()) < 2 * math.pi / 360  # within one angle step
    # copy j = shift(rotate(P, -delta), t): rotating by delta moves its shift to R_delta t
    c, s = torch.cos(delta), torch.sin(delta)
    t = shifts[1:]
    expected = -torch.stack([c * t[:, 0] - s * t[:, 1], s * t[:, 0] + c * t[:, 1]], dim=-1)
    assert float((found - expected).norm(dim=-1).max()) < 0.25  # a quarter of the shift grid step
    assert float(scores.min()) > 0.99
    # without shifts, the steerable-basis alignment finds the same angles
    centred = _copies(molecule_48, psi)
    basis = fourier_bessel_basis(48)
    coeffs = basis.expand(centred)
    fb_angles, fb_scores = align_coefficients(coeffs[0], coeffs[1:], basis)
    assert float(_angle_error(fb_angles, delta).max()) < math.radians(0.1)
    assert float(fb_scores.min()) > 0.99


# -------------------------------------------------------------------------------------- averaging
def test_class_average_of_ten_rotated_shifted_noisy_copies_recovers_the_image(molecule_48):
    """Acceptance test: averaging 10 aligned copies divides the noise energy by about 10."""
    g = torch.Generator().manual_seed(7)
    k = 10
    psi = torch.cat([torch.zeros(1), 360 * torch.rand(k - 1, generator=g)])
    shifts = torch.cat([torch.zeros(1, 2), 2.0 * (2 * torch.rand(k - 1, 2, generator=g) - 1)])
    clean = _copies(molecule_48, psi, shifts)
    sigma2 = float(clean.square().mean())  # noise energy = signal energy (SNR 1 over the box)
    noisy = clean + sigma2**0.5 * torch.randn(clean.shape, generator=g)
    noise = float(relative_mse(noisy, clean).mean())

    def average(images: torch.Tensor, s2: float) -> torch.Tensor:
        out = class_averages(images, noise_variance=s2, n_neighbors=k, centres=torch.tensor([0]),
                             max_shift=3.0, eps=0.0, denoise=False)
        assert out.members.shape == (1, k) and int(out.members[0, 0]) == 0
        return out.averages[0]

    interpolation = float(relative_mse(average(clean, 0.0), clean[0]))
    error = float(relative_mse(average(noisy, sigma2), clean[0]))
    assert interpolation < 0.01, interpolation
    # Rotating resamples the noise, which removes a little of it: 1/10 is an upper bound.
    assert 0.05 * noise < error < 0.1 * noise + interpolation + 0.01, (error, noise, interpolation)


def test_ctf_aware_average_of_ctf_affected_copies_approximates_the_ctf_free_image(molecule_48):
    g = torch.Generator().manual_seed(9)
    k, L = 10, 48
    psi = torch.cat([torch.zeros(1), 360 * torch.rand(k - 1, generator=g)])
    ctf = ctf_2d(random_ctf_params(k, generator=g, defocus_range=(8000.0, 20000.0)), L, 3.0)
    truth = _copies(molecule_48, psi[:1])[0]
    affected = _copies(molecule_48, psi, ctf=ctf)
    assert float(relative_mse(affected[0], truth)) > 0.3  # the CTF matters
    corrected = class_averages(affected, ctf, noise_variance=0.0, n_neighbors=k, centres=torch.tensor([0]))
    assert float(relative_mse(corrected.averages[0], truth)) < 0.01
    ignored = class_averages(affected, None, noise_variance=0.0, n_neighbors=k, centres=torch.tensor([0]))
    assert float(relative_mse(ignored.averages[0], truth)) > 0.3
    # With noise, the estimated Wiener term beats plain deconvolution (eps = 0).
    sigma2 = 2 * float(affected.square().mean())
    noisy = affected + sigma2**0.5 * torch.randn(affected.shape, generator=g)
    wiener = class_averages(noisy, ctf, noise_variance=sigma2, n_neighbors=k, centres=torch.tensor([0]))
    plain = class_averages(noisy, ctf, noise_variance=sigma2, n_neighbors=k, centres=torch.tensor([0]), eps=0.0)
    e_wiener = float(relative_mse(wiener.averages[0], truth))
    assert e_wiener < 0.05 and e_wiener < float(relative_mse(plain.averages[0], truth))


def test_denoised_classes_of_a_noisy_ctf_set(molecule_32):
    """End to end with CWF: neighbours stay close in viewing direction at SNR ~ 1/2."""
    g = torch.Generator().manual_seed(11)
    n, L = 300, 32
    rotations = random_rotations(n, generator=g)
    ctf = ctf_2d(random_ctf_params(n, generator=g, defocus_range=(10000.0, 20000.0)), L, 4.0)
    clean = ifft2c(project_spectrum(molecule_32, rotations) * ctf).real
    sigma2 = 2 * float(clean.square().mean())
    noisy = clean + sigma2**0.5 * torch.randn(clean.shape, generator=g)
    coeffs = steerable_coefficients(noisy, ctf, sigma2)
    assert coeffs.shape == (n, fourier_bessel_basis(L).count)
    out = class_averages(noisy, ctf, sigma2, n_neighbors=5, centres=40)
    assert out.averages.shape == (40, L, L) and out.members.shape == (40, 5)
    assert torch.equal(out.members[:, 0], out.centres) and bool((out.angles[:, 0].abs() < 1e-3).all())
    d = viewing_direction(rotations)
    angle = torch.rad2deg(torch.acos((d[out.members[:, 1:]] * d[out.centres, None]).sum(-1).clamp(-1, 1)))
    assert float(angle.median()) < 20.0
    truth = ifft2c(project_spectrum(molecule_32, rotations[out.centres])).real
    assert float(relative_mse(out.averages, truth).mean()) < 0.15
