"""Rotation-invariant features: invariance, mirrors, neighbours of close views."""

from __future__ import annotations

import torch

from cryo_lightning.abinitio.invariant_features import rotation_invariant_features
from cryo_lightning.abinitio.neighbors import nearest_neighbors
from cryo_lightning.physics.ctf import ctf_2d, random_ctf_params
from cryo_lightning.physics.fourier import _crop_or_pad, fourier_resize, ifft2c
from cryo_lightning.physics.noise import estimate_noise_variance
from cryo_lightning.physics.projection import project_spectrum
from cryo_lightning.physics.rotations import euler_to_matrix, matrix_to_euler, random_rotations, viewing_direction


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


def test_max_box_embeds_the_fourier_cropped_set(molecule_32):
    """Images and CTFs are cropped to the smaller box's band; white noise keeps that band's share."""
    g = torch.Generator().manual_seed(12)
    n, L, box = 100, 32, 16
    rotations = random_rotations(n, generator=g)
    ctf = ctf_2d(random_ctf_params(n, generator=g), L, 4.0)
    clean = ifft2c(project_spectrum(molecule_32, rotations) * ctf).real
    sigma2 = float(clean.square().mean())
    noisy = clean + sigma2**0.5 * torch.randn(clean.shape, generator=g)
    small, small_ctf = fourier_resize(noisy, box, 2), _crop_or_pad(ctf, box, 2)
    expected = rotation_invariant_features(small, small_ctf, sigma2 * (box / L) ** 2)
    torch.testing.assert_close(rotation_invariant_features(noisy, ctf, sigma2, max_box=box), expected)
    assert abs(float(estimate_noise_variance(small).mean()) / (sigma2 * (box / L) ** 2) - 1) < 0.1
    torch.testing.assert_close(rotation_invariant_features(noisy, ctf, sigma2, max_box=L),
                               rotation_invariant_features(noisy, ctf, sigma2))
