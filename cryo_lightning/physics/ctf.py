"""Contrast transfer function, exactly as RELION defines it (``src/ctf.cpp``, ``src/ctf.h``).

Sign convention: ``CTF = -S * sin(gamma) * exp(-B s^2 / 4)``, which is **positive at s = 0**
(``S * (Q cos(phi) + sqrt(1 - Q^2) sin(phi))``). cryoDRGN's and ASPIRE's CTFs are the negative of
this one. With white-protein images, ``image ~ CTF * projection + noise``.

With ``s`` the spatial frequency and ``alpha = atan2(ky, kx)``::

    Df(alpha) = (dU + dV) / 2 + (dU - dV) / 2 * cos(2 (alpha - theta_a))
    chi       = -pi lambda Df(alpha) s^2 + (pi / 2) (Cs 1e7) lambda^3 s^4
    gamma     = chi - phase_shift - arctan(Q / sqrt(1 - Q^2))

Units follow RELION's STAR columns: defocus in Angstrom (underfocus positive), angles in degrees,
voltage in kV, Cs in mm, B-factor in Angstrom^2. Spatial frequency ``s`` is in 1/Angstrom.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cryo_lightning.physics.fourier import fft2c, frequency_grid, ifft2c

__all__ = [
    "electron_wavelength",
    "CTFParams",
    "random_ctf_params",
    "ctf_1d",
    "ctf_2d",
    "apply_ctf",
    "phase_flip",
]

# Field name -> RELION STAR column, and the default for optional fields (None = required).
STAR_COLUMNS = {
    "defocus_u": ("rlnDefocusU", None),
    "defocus_v": ("rlnDefocusV", None),
    "defocus_angle": ("rlnDefocusAngle", None),
    "voltage": ("rlnVoltage", None),
    "cs": ("rlnSphericalAberration", None),
    "amplitude_contrast": ("rlnAmplitudeContrast", None),
    "phase_shift": ("rlnPhaseShift", 0.0),
    "bfactor": ("rlnCtfBfactor", 0.0),
    "scale": ("rlnCtfScalefactor", 1.0),
}


def electron_wavelength(voltage_kv: float | torch.Tensor) -> float | torch.Tensor:
    """Relativistic electron wavelength in Angstrom (RELION's constants), e.g. 300 kV -> 0.019688.

    Args:
        voltage_kv: accelerating voltage in kV, float or tensor of any shape.
    """
    v = voltage_kv * 1000.0
    if isinstance(v, torch.Tensor):
        return 12.2643247 / torch.sqrt(v * (1.0 + 0.978466e-6 * v))
    return 12.2643247 / math.sqrt(v * (1.0 + 0.978466e-6 * v))


@dataclasses.dataclass
class CTFParams:
    """Per-particle CTF parameters: tensors of one common batch shape ``(...)``, RELION units.

    Scalars and broadcastable tensors are accepted and broadcast to the common shape; all fields
    take the dtype (float32 unless float64 is given) and device of ``defocus_u``.
    """

    defocus_u: torch.Tensor  # Angstrom, underfocus positive
    defocus_v: torch.Tensor  # Angstrom
    defocus_angle: torch.Tensor  # degrees, from +x to the DefocusU direction
    voltage: torch.Tensor  # kV
    cs: torch.Tensor  # mm
    amplitude_contrast: torch.Tensor  # fraction Q
    phase_shift: torch.Tensor | float = 0.0  # degrees
    bfactor: torch.Tensor | float = 0.0  # Angstrom^2
    scale: torch.Tensor | float = 1.0

    def __post_init__(self) -> None:
        ref = torch.as_tensor(self.defocus_u)
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        fields = self.fields()
        values = [torch.as_tensor(getattr(self, f), dtype=dtype, device=ref.device) for f in fields]
        for f, v in zip(fields, torch.broadcast_tensors(*values)):
            setattr(self, f, v)

    @staticmethod
    def fields() -> tuple[str, ...]:
        """Field names, in the order of :data:`STAR_COLUMNS`."""
        return tuple(STAR_COLUMNS)

    @property
    def batch_shape(self) -> torch.Size:
        """The common shape ``(...)`` of all fields."""
        return self.defocus_u.shape

    def _map(self, fn: Any) -> CTFParams:
        return CTFParams(**{f: fn(getattr(self, f)) for f in self.fields()})

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> CTFParams:
        """Move/cast every field (dtypes other than float64 end up float32)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def __getitem__(self, index: Any) -> CTFParams:
        """Index the batch axes, e.g. ``params[:, 3]``."""
        return self._map(lambda t: t[index])

    def reshape(self, *shape: int) -> CTFParams:
        """Reshape the batch axes."""
        return self._map(lambda t: t.reshape(*shape))

    @classmethod
    def cat(cls, params: Sequence[CTFParams], dim: int = 0) -> CTFParams:
        """Concatenate along an existing batch axis."""
        return cls(**{f: torch.cat([getattr(p, f) for p in params], dim) for f in cls.fields()})

    @classmethod
    def stack(cls, params: Sequence[CTFParams], dim: int = 0) -> CTFParams:
        """Stack along a new batch axis."""
        return cls(**{f: torch.stack([getattr(p, f) for p in params], dim) for f in cls.fields()})

    @classmethod
    def from_dict(
        cls,
        columns: Mapping[str, Any],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> CTFParams:
        """Build from RELION STAR columns (``rlnDefocusU``, ...; a leading ``_`` is allowed).

        Values may be scalars, sequences, arrays or tensors. Missing ``rlnPhaseShift``,
        ``rlnCtfBfactor`` and ``rlnCtfScalefactor`` default to 0, 0 and 1; any other missing
        column raises ``KeyError`` (RELION's silent defaults are deliberately not copied).
        """
        cols = {k.lstrip("_"): v for k, v in columns.items()}
        kwargs = {}
        for field, (name, default) in STAR_COLUMNS.items():
            if name not in cols and default is None:
                raise KeyError(f"CTF column {name} is missing (have: {sorted(cols)})")
            value = cols.get(name, default)
            if not isinstance(value, torch.Tensor):  # copies read-only numpy views (pandas)
                value = np.array(value, dtype=np.float64)
            kwargs[field] = torch.as_tensor(value, dtype=dtype, device=device)
        return cls(**kwargs)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """RELION STAR column name -> tensor ``(...)``."""
        return {name: getattr(self, f) for f, (name, _) in STAR_COLUMNS.items()}


def random_ctf_params(
    n: int | Sequence[int],
    generator: torch.Generator | None = None,
    defocus_range: tuple[float, float] = (5000.0, 25000.0),
    max_astigmatism: float = 300.0,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    phase_shift: float = 0.0,
    bfactor: float = 0.0,
    scale: float = 1.0,
    device: torch.device | str | None = None,
) -> CTFParams:
    """Random CTF parameters for synthetic data, batch shape ``(n,)`` (or ``n`` if a shape).

    Mean defocus is uniform in ``defocus_range`` (Angstrom); ``defocus_u - defocus_v`` is uniform
    in ``[0, max_astigmatism]`` (so ``defocus_u >= defocus_v``); the angle is uniform in [0, 180).
    """
    shape = (n,) if isinstance(n, int) else tuple(n)
    gen_device = generator.device if generator is not None else device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        u = torch.rand(shape, generator=generator, device=gen_device)
        return (lo + (hi - lo) * u).to(device)

    mean = uniform(*defocus_range)
    astig = uniform(0.0, max_astigmatism)
    return CTFParams(
        defocus_u=mean + astig / 2, defocus_v=mean - astig / 2, defocus_angle=uniform(0.0, 180.0),
        voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast,
        phase_shift=phase_shift, bfactor=bfactor, scale=scale,
    )


def _ctf(params: CTFParams, s2: torch.Tensor, alpha: torch.Tensor, n_grid: int) -> torch.Tensor:
    """RELION CTF at squared frequency ``s2`` (1/A^2) and angle ``alpha`` (rad) ``(..., *grid)``."""

    def b(t: torch.Tensor) -> torch.Tensor:  # batch fields broadcast against the trailing grid axes
        return t.reshape(t.shape + (1,) * n_grid)

    lam = electron_wavelength(b(params.voltage))
    theta = torch.deg2rad(b(params.defocus_angle))
    du, dv = b(params.defocus_u), b(params.defocus_v)
    # cos(2(alpha - theta)) expanded, so the per-pixel trigonometry is shared by the batch.
    astig = torch.cos(2.0 * alpha) * torch.cos(2.0 * theta) + torch.sin(2.0 * alpha) * torch.sin(2.0 * theta)
    defocus = 0.5 * (du + dv) + 0.5 * (du - dv) * astig
    chi = -math.pi * lam * defocus * s2 + (math.pi / 2) * (b(params.cs) * 1e7) * lam**3 * s2**2
    q = b(params.amplitude_contrast)
    gamma = chi - (torch.deg2rad(b(params.phase_shift)) + torch.atan(q / torch.sqrt(1.0 - q * q)))
    ctf = -b(params.scale) * torch.sin(gamma)
    if bool((params.bfactor != 0).any()):
        ctf = ctf * torch.exp(-b(params.bfactor) * s2 / 4.0)
    return ctf


def ctf_1d(params: CTFParams, s: torch.Tensor, angle: float | torch.Tensor = 0.0) -> torch.Tensor:
    """RELION CTF at spatial frequencies ``s`` (1/Angstrom) along direction ``angle``.

    Args:
        params: batch shape ``(...)``.
        s: ``(M,)`` frequency magnitudes, 1/Angstrom.
        angle: degrees from +x (scalar or ``(M,)``), the same angle as ``defocus_angle``.
    Returns:
        ``(..., M)`` in the dtype of ``params``.
    """
    s = torch.as_tensor(s, dtype=params.defocus_u.dtype, device=params.defocus_u.device)
    alpha = torch.deg2rad(torch.as_tensor(angle, dtype=s.dtype, device=s.device)).expand_as(s)
    return _ctf(params, s * s, alpha, n_grid=1)


def ctf_2d(params: CTFParams, L: int, pixel_size: float | torch.Tensor) -> torch.Tensor:
    """RELION CTF sampled on the centred ``L x L`` Fourier grid of the project.

    Sample ``[i, j]`` has ``ky = (i - L//2) / (L p)`` and ``kx = (j - L//2) / (L p)`` (1/Angstrom),
    ``alpha = atan2(ky, kx)``. Computed in float32 unless ``params`` are float64.

    Args:
        params: batch shape ``(...)``.
        L: box size in pixels.
        pixel_size: Angstrom, a float or a tensor broadcastable to ``(...)``.
    Returns:
        ``(..., L, L)`` real CTF.
    """
    dtype, device = params.defocus_u.dtype, params.defocus_u.device
    ky, kx = frequency_grid(L, 2, device=device, dtype=dtype)
    p = torch.as_tensor(pixel_size, dtype=dtype, device=device)
    s2 = (kx * kx + ky * ky) / (p * p).reshape(p.shape + (1, 1))
    return _ctf(params, s2, torch.atan2(ky, kx), n_grid=2)


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Multiply the images' centred Fourier transforms by ``ctf`` and return the real part.

    Args:
        images: ``(..., L, L)`` real.
        ctf: ``(..., L, L)`` real, broadcastable against ``images`` (e.g. from :func:`ctf_2d`).
    """
    return ifft2c(fft2c(images) * ctf).real.to(images.dtype)


def phase_flip(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Phase-flip images: multiply their transforms by ``sign(ctf)`` (0 where the CTF is 0).

    Args:
        images: ``(..., L, L)`` real.
        ctf: ``(..., L, L)`` real, broadcastable against ``images``.
    """
    return apply_ctf(images, torch.sign(ctf))
