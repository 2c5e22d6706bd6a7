"""Class averaging end to end: noisy, shifted and CTF-affected copies, and a noisy CTF set."""

from __future__ import annotations

import torch

from cryo_lightning.abinitio.class_average import class_averages
from cryo_lightning.abinitio.invariant_features import steerable_coefficients
from cryo_lightning.metrics import relative_mse
from cryo_lightning.physics.ctf import ctf_2d, random_ctf_params
from cryo_lightning.physics.fourier import ifft2c
from cryo_lightning.physics.projection import project_spectrum
from cryo_lightning.physics.rotations import random_rotations, viewing_direction
from cryo_lightning.physics.steerable_basis import fourier_bessel_basis
from tests.abinitio.conftest import copies


def test_class_average_of_ten_rotated_shifted_noisy_copies_recovers_the_image(molecule_48):
    """Acceptance test: averaging 10 aligned copies divides the noise energy by about 10."""
    g = torch.Generator().manual_seed(7)
    k = 10
    psi = torch.cat([torch.zeros(1), 360 * torch.rand(k - 1, generator=g)])
    shifts = torch.cat([torch.zeros(1, 2), 2.0 * (2 * torch.rand(k - 1, 2, generator=g) - 1)])
    clean = copies(molecule_48, psi, shifts)
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
    truth = copies(molecule_48, psi[:1])[0]
    affected = copies(molecule_48, psi, ctf=ctf)
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
