from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryo_lightning.physics.ctf import (
    CTFParams,
    apply_ctf,
    ctf_1d,
    ctf_2d,
    electron_wavelength,
    phase_flip,
    random_ctf_params,
)


def params(dtype=torch.float64, **kw) -> CTFParams:
    base = dict(defocus_u=15000.0, defocus_v=15000.0, defocus_angle=0.0, voltage=300.0, cs=2.7,
                amplitude_contrast=0.1)
    base.update(kw)
    return CTFParams(**{k: torch.tensor(v, dtype=dtype) for k, v in base.items()})


def first_zero(values: np.ndarray, s: np.ndarray) -> float:
    """First sign change after s = 0 (skipped: CTF(0) = 0 when Q = 0), linearly interpolated."""
    i = np.nonzero(np.sign(values[2:]) != np.sign(values[1:-1]))[0][0] + 1
    return s[i] - values[i] * (s[i + 1] - s[i]) / (values[i + 1] - values[i])


@pytest.mark.parametrize(
    "kv, lam", [(300, 0.019688), (200, 0.025079), (120, 0.033492), (100, 0.037015)]
)
def test_wavelength(kv, lam):
    assert electron_wavelength(kv) == pytest.approx(lam, abs=1e-5)
    lam_t = electron_wavelength(torch.tensor(float(kv), dtype=torch.float64))
    assert float(lam_t) == pytest.approx(lam, abs=1e-5)


@pytest.mark.parametrize("phase", [0.0, 90.0, 37.0])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_value_at_zero_frequency(phase, scale):
    q = 0.1
    phi = math.radians(phase)
    expected = scale * (q * math.cos(phi) + math.sqrt(1 - q * q) * math.sin(phi))
    p = params(phase_shift=phase, scale=scale)
    assert ctf_1d(p, torch.zeros(1)).item() == pytest.approx(expected, abs=1e-12)
    assert ctf_2d(p, 32, 1.5)[16, 16].item() == pytest.approx(expected, abs=1e-12)


def test_first_zero_no_cs_no_amplitude_contrast():
    p = params(cs=0.0, amplitude_contrast=0.0, defocus_u=12000.0, defocus_v=12000.0)
    s0 = 1.0 / math.sqrt(electron_wavelength(300.0) * 12000.0)
    s = np.linspace(0.0, 1.5 * s0, 300001)
    values = ctf_1d(p, torch.from_numpy(s)).numpy()
    assert first_zero(values, s) == pytest.approx(s0, rel=1e-8)


def test_first_zero_with_cs_and_amplitude_contrast():
    dz, cs, q, kv = 20000.0, 2.7, 0.1, 300.0
    lam = electron_wavelength(kv)
    # gamma = -pi: (pi/2) Cs 1e7 lam^3 s^4 - pi lam dz s^2 + (pi - arcsin Q) = 0
    quartic = [math.pi / 2 * cs * 1e7 * lam**3, 0.0, -math.pi * lam * dz, 0.0,
               math.pi - math.asin(q)]
    roots = np.roots(quartic)
    s0 = min(r.real for r in roots if abs(r.imag) < 1e-12 and r.real > 0)
    s = np.linspace(0.0, 1.5 * s0, 300001)
    for dtype in (torch.float64, torch.float32):
        p = params(dtype, cs=cs, amplitude_contrast=q, defocus_u=dz, defocus_v=dz)
        values = ctf_1d(p, torch.from_numpy(s)).double().numpy()
        assert first_zero(values, s) == pytest.approx(s0, rel=1e-4)


def test_astigmatism_direction_1d():
    du, dv, theta = 15000.0, 10000.0, 30.0
    p = params(cs=0.0, amplitude_contrast=0.0, defocus_u=du, defocus_v=dv, defocus_angle=theta)
    lam = electron_wavelength(300.0)
    s = np.linspace(0.0, 0.1, 200001)
    for angle, dz in [(theta, du), (theta + 90.0, dv), (theta + 180.0, du), (theta - 90.0, dv)]:
        values = ctf_1d(p, torch.from_numpy(s), angle).numpy()
        assert first_zero(values, s) == pytest.approx(1 / math.sqrt(lam * dz), rel=1e-7)


@pytest.mark.parametrize("theta, axis_u", [(0.0, "x"), (90.0, "y")])
def test_astigmatism_direction_2d_axes(theta, axis_u):
    du, dv, L, px = 15000.0, 10000.0, 512, 1.0
    p = params(cs=0.0, amplitude_contrast=0.0, defocus_u=du, defocus_v=dv, defocus_angle=theta)
    c = ctf_2d(p, L, px).numpy()
    s = np.arange(L // 2) / (L * px)
    along_x, along_y = c[L // 2, L // 2:], c[L // 2:, L // 2]  # rows are ky, columns kx
    lam = electron_wavelength(300.0)
    dz_x, dz_y = (du, dv) if axis_u == "x" else (dv, du)
    assert first_zero(along_x, s) == pytest.approx(1 / math.sqrt(lam * dz_x), rel=2e-3)
    assert first_zero(along_y, s) == pytest.approx(1 / math.sqrt(lam * dz_y), rel=2e-3)


def test_ctf_2d_matches_relion_bilinear_form():
    """Independent reference: RELION's ``K1 * x^T A x`` with ``A = Q^T diag(-dU, -dV) Q``."""
    du, dv, theta, kv, cs, q = 15000.0, 11000.0, 30.0, 200.0, 2.0, 0.07
    phase, B, S, L, px = 20.0, 50.0, 1.3, 64, 1.7
    p = params(defocus_u=du, defocus_v=dv, defocus_angle=theta, voltage=kv, cs=cs,
               amplitude_contrast=q, phase_shift=phase, bfactor=B, scale=S)
    lam = electron_wavelength(kv)
    k = (np.arange(L) - L // 2) / (L * px)
    y, x = np.meshgrid(k, k, indexing="ij")
    t = math.radians(theta)
    Q = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
    A = Q.T @ np.diag([-du, -dv]) @ Q
    u2 = x**2 + y**2
    gamma = (math.pi * lam * (A[0, 0] * x * x + 2 * A[0, 1] * x * y + A[1, 1] * y * y)
             + math.pi / 2 * cs * 1e7 * lam**3 * u2**2
             - math.radians(phase) - math.atan(q / math.sqrt(1 - q * q)))
    ref = -S * np.sin(gamma) * np.exp(-B * u2 / 4)
    np.testing.assert_allclose(ctf_2d(p, L, px).numpy(), ref, atol=1e-10)
    np.testing.assert_allclose(ctf_2d(p.to(dtype=torch.float32), L, px).numpy(), ref, atol=2e-4)


def test_sign_and_cryodrgn_relation():
    q, phase = 0.1, 10.0
    p = params(defocus_u=14000.0, defocus_v=13000.0, defocus_angle=40.0, amplitude_contrast=q,
               phase_shift=phase)
    L, px = 64, 1.2
    c = ctf_2d(p, L, px).numpy()
    assert c[L // 2, L // 2] > 0 and c[L // 2, L // 2 + 1] > 0
    # cryoDRGN-style formula (written independently), expected to be exactly -CTF_RELION
    lam = electron_wavelength(300.0)
    k = (np.arange(L) - L // 2) / (L * px)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    ang = np.arctan2(ky, kx)
    s2 = kx**2 + ky**2
    dfu, dfv, dfang = 14000.0, 13000.0, math.radians(40.0)
    df = 0.5 * (dfu + dfv + (dfu - dfv) * np.cos(2 * (ang - dfang)))
    g = 2 * np.pi * (-0.5 * df * lam * s2 + 0.25 * 2.7e7 * lam**3 * s2**2) - math.radians(phase)
    drgn = np.sqrt(1 - q**2) * np.sin(g) - q * np.cos(g)
    np.testing.assert_allclose(c, -drgn, atol=1e-6)


def test_bfactor_envelope():
    s = torch.linspace(0.0, 0.3, 1001, dtype=torch.float64)
    base = ctf_1d(params(), s)
    damped = ctf_1d(params(bfactor=120.0), s)
    keep = base.abs() > 1e-3
    envelope = torch.exp(-120.0 * s**2 / 4)
    np.testing.assert_allclose((damped / base)[keep].numpy(), envelope[keep].numpy(), rtol=1e-9)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_hermitian_symmetry_and_dtype(dtype, atol):
    p = params(dtype, defocus_u=16000.0, defocus_v=15200.0, defocus_angle=63.0, phase_shift=30.0)
    c = ctf_2d(p, 64, 1.1)
    assert c.dtype == dtype and c.shape == (64, 64)
    inner = c[1:, 1:]  # k -> -k maps index i to 64 - i; row/column 0 (Nyquist) has no partner
    torch.testing.assert_close(inner, torch.flip(inner, (0, 1)), atol=atol, rtol=0)


def test_batch_shapes_and_per_batch_pixel_size():
    g = torch.Generator().manual_seed(0)
    p = random_ctf_params((2, 3), generator=g)
    px = torch.tensor([[1.0], [2.5]])
    c = ctf_2d(p, 16, px)
    assert c.shape == (2, 3, 16, 16)
    for b in range(2):
        for n in range(3):
            torch.testing.assert_close(c[b, n], ctf_2d(p[b, n], 16, float(px[b, 0])))
    assert ctf_1d(p, torch.linspace(0, 0.1, 7)).shape == (2, 3, 7)


def test_params_container():
    g = torch.Generator().manual_seed(1)
    p = random_ctf_params(5, generator=g, defocus_range=(8000.0, 9000.0), max_astigmatism=200.0)
    assert p.batch_shape == (5,)
    mean, astig = (p.defocus_u + p.defocus_v) / 2, p.defocus_u - p.defocus_v
    assert bool((mean >= 8000).all() and (mean <= 9000).all())
    assert bool((astig >= 0).all() and (astig <= 200.0 + 1e-3).all())
    q = random_ctf_params(5, generator=torch.Generator().manual_seed(1),
                          defocus_range=(8000.0, 9000.0), max_astigmatism=200.0)
    torch.testing.assert_close(p.defocus_angle, q.defocus_angle)
    d = p.as_dict()
    assert d["rlnVoltage"].tolist() == [300.0] * 5 and d["rlnCtfScalefactor"].tolist() == [1.0] * 5
    r = CTFParams.from_dict({("_" + k if i % 2 else k): v for i, (k, v) in enumerate(d.items())})
    for k in d:
        torch.testing.assert_close(r.as_dict()[k], d[k])
    assert CTFParams.cat([p[:2], p[2:]]).batch_shape == (5,)
    assert CTFParams.stack([p, p], dim=1).batch_shape == (5, 2)
    assert p.reshape(5, 1).batch_shape == (5, 1)
    assert p.to(dtype=torch.float64).scale.dtype == torch.float64
    minimal = {k: d[k] for k in ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
                                 "rlnSphericalAberration", "rlnAmplitudeContrast"]}
    assert CTFParams.from_dict(minimal).phase_shift.tolist() == [0.0] * 5
    with pytest.raises(KeyError, match="rlnSphericalAberration"):
        CTFParams.from_dict({k: v for k, v in minimal.items() if k != "rlnSphericalAberration"})


def test_apply_ctf_and_phase_flip():
    # odd L: every frequency has its mirror on the grid, so the identities below hold exactly
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 33, 33, generator=g)
    p = random_ctf_params(3, generator=g)
    c = ctf_2d(p, 33, 2.0)
    torch.testing.assert_close(apply_ctf(x, torch.ones(33, 33)), x, atol=1e-5, rtol=0)
    # point at the centre -> the CTF's real-space point spread function, whose sum is CTF(0)
    delta = torch.zeros(33, 33)
    delta[16, 16] = 1.0
    psf = apply_ctf(delta, c)
    torch.testing.assert_close(psf.sum((-2, -1)), c[:, 16, 16], atol=1e-5, rtol=0)
    # flipping CTF-affected images leaves |CTF|; flipping twice is the identity where CTF != 0
    flipped = phase_flip(apply_ctf(x, c), c)
    torch.testing.assert_close(flipped, apply_ctf(x, c.abs()), atol=1e-5, rtol=0)
    torch.testing.assert_close(phase_flip(phase_flip(x, c), c), x, atol=1e-5, rtol=0)
