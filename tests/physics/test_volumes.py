from __future__ import annotations

import math

import pytest
import torch

from cryo_lightning.physics.fourier import radial_grid
from cryo_lightning.physics.volumes import (
    center_crop_or_pad,
    gaussian_density,
    random_molecule,
    resample_volume,
    resolution_to_sigma,
    soft_sphere_mask,
)


def _coords(L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, y, x) grids of pixel offsets from the centre L // 2, float64."""
    r = torch.arange(L, dtype=torch.float64) - L // 2
    return torch.meshgrid(r, r, r, indexing="ij")


def _moments(vol: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of mass (x, y, z) and 3x3 covariance (pixels) of a non-negative volume."""
    z, y, x = _coords(vol.shape[-1])
    w = vol.double() / vol.double().sum()
    pts = torch.stack([x, y, z]).reshape(3, -1)
    mean = pts @ w.reshape(-1)
    cov = (pts * w.reshape(-1)) @ pts.T - torch.outer(mean, mean)
    return mean, cov


SEEDS = range(8)


@pytest.fixture(scope="module")
def molecules() -> list[torch.Tensor]:
    return [random_molecule(32, torch.Generator().manual_seed(s)) for s in SEEDS]


def test_random_molecule_deterministic_and_seed_dependent(molecules):
    again = random_molecule(32, torch.Generator().manual_seed(0))
    assert again.shape == (32, 32, 32) and again.dtype == torch.float32
    assert torch.equal(again, molecules[0])
    for a, b in zip(molecules, molecules[1:]):
        assert (a - b).abs().max() > 0.5


def test_random_molecule_positive_normalised_and_inside(molecules):
    L = 32
    r = radial_grid(L, 3)
    for vol in molecules:
        assert torch.isfinite(vol).all()
        assert vol.min() >= 0.0
        assert vol.max().item() == pytest.approx(1.0)
        assert vol[r <= 0.45 * L].sum() / vol.sum() > 0.99
        # Every projection (along each axis) keeps its mass in the inscribed disk.
        r2 = radial_grid(L, 2)
        for axis in range(3):
            proj = vol.sum(axis)
            assert proj[r2 <= L / 2].sum() / proj.sum() > 0.999


def test_random_molecule_shapes_vary_and_are_not_symmetric(molecules):
    ratios, sizes = [], []
    for vol in molecules:
        _, cov = _moments(vol)
        ev = torch.linalg.eigvalsh(cov)
        ratios.append((ev[-1] / ev[0]).item())
        sizes.append(ev.sum().sqrt().item())
    # Largest / smallest second moment: far from a sphere (1.0) for every seed...
    assert min(ratios) > 1.3
    # ...and different from one molecule to the next, in shape and in size.
    assert max(ratios) / min(ratios) > 1.5
    assert max(sizes) / min(sizes) > 1.15


def test_random_molecule_larger_box_and_device_args():
    g = torch.Generator().manual_seed(3)
    vol = random_molecule(64, g, dtype=torch.float64)
    assert vol.shape == (64, 64, 64) and vol.dtype == torch.float64
    r = radial_grid(64, 3, dtype=torch.float64)
    assert vol[r <= 0.45 * 64].sum() / vol.sum() > 0.99


def test_gaussian_density_single_atom_mass_width_and_centre():
    L, pixel, res, weight = 32, 1.5, 6.0, 7.0
    vol = gaussian_density(
        torch.zeros(1, 3), torch.tensor([weight]), L, pixel, res, dtype=torch.float64
    )
    sigma_A = res / (math.pi * math.sqrt(2.0))
    assert resolution_to_sigma(res) == pytest.approx(sigma_A)
    # Density per A^3: integral = weight.
    assert (vol.sum() * pixel**3).item() == pytest.approx(weight, rel=1e-4)
    # Peak value of a normalised 3D Gaussian.
    peak = weight / ((2 * math.pi) ** 1.5 * sigma_A**3)
    assert vol[L // 2, L // 2, L // 2].item() == pytest.approx(peak, rel=1e-6)
    mean, cov = _moments(vol)
    assert torch.allclose(mean, torch.zeros(3, dtype=torch.float64), atol=1e-9)
    sigma_px = sigma_A / pixel
    assert torch.allclose(cov, sigma_px**2 * torch.eye(3, dtype=torch.float64), atol=1e-6)


def test_gaussian_density_axis_order():
    L, pixel = 32, 2.0
    offset = torch.tensor([[4.0, -6.0, 10.0]])  # (x, y, z) Angstrom
    vol = gaussian_density(offset, torch.ones(1), L, pixel, 4.0, center=False)
    z, y, x = (int(i) for i in torch.nonzero(vol == vol.max())[0])
    assert (z, y, x) == (L // 2 + 5, L // 2 - 3, L // 2 + 2)
    mean, _ = _moments(vol)  # (x, y, z) pixels from the centre
    assert torch.allclose(mean, offset[0].double() / pixel, atol=1e-3)


def test_gaussian_density_center_puts_centre_of_mass_at_box_centre():
    coords = torch.tensor([[10.0, 12.0, -3.0], [14.0, 12.0, -3.0], [10.0, 15.0, 1.0]])
    weights = torch.tensor([6.0, 8.0, 16.0])
    vol = gaussian_density(coords, weights, 33, 1.0, 5.0, dtype=torch.float64)
    mean, _ = _moments(vol)
    assert torch.allclose(mean, torch.zeros(3, dtype=torch.float64), atol=1e-4)
    assert (vol.sum()).item() == pytest.approx(weights.sum().item(), rel=1e-4)


@pytest.mark.parametrize("L_in,L_out", [(64, 32), (63, 33)])
def test_resample_volume_matches_analytic_gaussian(L_in, L_out):
    sigma_A, p_in, p_out = 4.0, 1.0, 2.0
    shift = torch.tensor([3.0, -2.0, 1.0])  # (x, y, z) Angstrom: checks the centre is kept

    def analytic(L: int, pixel: float) -> torch.Tensor:
        z, y, x = _coords(L)
        d2 = (x * pixel - shift[0]) ** 2 + (y * pixel - shift[1]) ** 2 + (z * pixel - shift[2]) ** 2
        return torch.exp(-d2 / (2 * sigma_A**2)) / ((2 * math.pi) ** 1.5 * sigma_A**3)

    out = resample_volume(analytic(L_in, p_in), p_in, p_out, L_out)
    expected = analytic(L_out, p_out)
    assert out.shape == (L_out,) * 3
    assert (out - expected).abs().max() < 1e-6 * expected.max()
    # Mass (density x voxel volume) is preserved.
    assert (out.sum() * p_out**3).item() == pytest.approx(1.0, rel=1e-6)


def test_resample_volume_non_integer_ratio_and_upsampling():
    sigma_A = 5.0

    def analytic(L: int, pixel: float) -> torch.Tensor:
        z, y, x = _coords(L)
        return torch.exp(-(x**2 + y**2 + z**2) * pixel**2 / (2 * sigma_A**2))

    # 40 * 1.3 / 1.7 is not an integer: the input is padded first.
    out = resample_volume(analytic(40, 1.3), 1.3, 1.7, 36)
    assert (out - analytic(36, 1.7)).abs().max() < 1e-5
    up = resample_volume(analytic(24, 2.0), 2.0, 1.0, 40)
    assert (up - analytic(40, 1.0)).abs().max() < 1e-5


def test_center_crop_or_pad_keeps_centre():
    for L, L_new in [(8, 5), (7, 10), (9, 9), (6, 11)]:
        v = torch.zeros(L, L, L)
        v[L // 2, L // 2, L // 2] = 1.0
        out = center_crop_or_pad(v, L_new)
        assert out.shape == (L_new,) * 3
        assert out[L_new // 2, L_new // 2, L_new // 2] == 1.0 and out.sum() == 1.0


def test_soft_sphere_mask():
    L = 32
    m = soft_sphere_mask(L, radius=8.0, width=4.0)
    r = radial_grid(L, 3)
    assert torch.all(m[r <= 8.0] == 1.0) and torch.all(m[r >= 12.0] == 0.0)
    edge = (r > 8.0) & (r < 12.0)
    assert torch.allclose(m[edge], 0.5 * (1 + torch.cos(math.pi * (r[edge] - 8.0) / 4.0)))
    assert torch.equal(soft_sphere_mask(L, 8.0, 0.0), (r <= 8.0).float())
