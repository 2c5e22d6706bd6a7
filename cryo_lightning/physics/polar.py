"""Polar sampling of image spectra: in-plane rotations become cyclic shifts along the angle axis.

A polar spectrum has ``R`` radii ``rho_r = 0.5 r / (R - 1)`` cycles/pixel (centre to Nyquist) and
``T`` angles ``theta_t = 2 pi t / T`` measured from the +kx axis towards +ky. Rotating an image by
``2 pi s / T`` shifts its polar spectrum by ``s`` angle samples (up to interpolation error).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cryo_lightning.physics.fourier import fft2c, frequency_grid, ifft2c

__all__ = ["PolarSpectrum"]


class PolarSpectrum(nn.Module):
    """Cartesian <-> polar resampling of centred 2D spectra for ``L x L`` images.

    The forward direction zero-pads images by 2 before the FFT (a finer spectrum, so bilinear
    interpolation is accurate); the inverse interpolates the polar samples back onto the ``L x L``
    frequency grid (bilinear in radius, periodic in angle) and zeroes frequencies beyond Nyquist.

    Args:
        L: image size.
        n_radii: ``R``.
        n_angles: ``T`` (a multiple of 4 makes 90-degree rotations exact shifts).
    """

    def __init__(self, L: int, n_radii: int, n_angles: int) -> None:
        super().__init__()
        self.L, self.R, self.T = L, n_radii, n_angles
        rho = 0.5 * torch.arange(n_radii, dtype=torch.float64) / (n_radii - 1)
        theta = 2 * math.pi * torch.arange(n_angles, dtype=torch.float64) / n_angles
        Lp = 2 * L
        kx = rho[:, None] * torch.cos(theta)[None, :]
        ky = rho[:, None] * torch.sin(theta)[None, :]
        # grid_sample coordinates (x, y) into the centred (2L, 2L) spectrum, align_corners=True.
        to_polar = torch.stack([(kx * Lp + Lp // 2), (ky * Lp + Lp // 2)], -1) * 2 / (Lp - 1) - 1
        self.register_buffer("to_polar_grid", to_polar.float()[None], persistent=False)
        # And for the (L, L) CTF, sampled on the original grid.
        ctf_grid = torch.stack([(kx * L + L // 2), (ky * L + L // 2)], -1) * 2 / (L - 1) - 1
        self.register_buffer("ctf_grid", ctf_grid.float()[None], persistent=False)
        # Back: every Cartesian frequency as (angle index, radius index) into the wrapped polar array.
        fy, fx = frequency_grid(L, 2, dtype=torch.float64)
        radius = torch.sqrt(fx * fx + fy * fy) / 0.5 * (n_radii - 1)
        angle = torch.remainder(torch.atan2(fy, fx), 2 * math.pi) / (2 * math.pi) * n_angles
        back = torch.stack([angle * 2 / n_angles - 1, radius * 2 / (n_radii - 1) - 1], -1)
        self.register_buffer("to_cartesian_grid", back.float()[None], persistent=False)

    def _sample(self, values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Bilinear samples of ``(M, C, H, W)`` at ``grid (1, h, w, 2)`` -> ``(M, C, h, w)``."""
        return F.grid_sample(values, grid.expand(values.shape[0], -1, -1, -1), mode="bilinear",
                             padding_mode="zeros", align_corners=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Polar spectra of real images: ``(..., L, L)`` -> ``(..., R, T)`` complex."""
        lead, L = images.shape[:-2], self.L
        x = images.reshape(-1, L, L)
        left = L - L // 2  # centre index L // 2 -> (2L) // 2
        padded = F.pad(x, (left, L - left, left, L - left))
        spec = torch.view_as_real(fft2c(padded)).permute(0, 3, 1, 2)  # (M, 2, 2L, 2L)
        polar = self._sample(spec, self.to_polar_grid)
        return torch.complex(polar[:, 0], polar[:, 1]).reshape(*lead, self.R, self.T)

    def sample_ctf(self, ctf: torch.Tensor) -> torch.Tensor:
        """A real centred ``(..., L, L)`` CTF on the polar grid: ``(..., R, T)``."""
        lead = ctf.shape[:-2]
        out = self._sample(ctf.reshape(-1, 1, self.L, self.L), self.ctf_grid)
        return out.reshape(*lead, self.R, self.T)

    def inverse(self, polar: torch.Tensor) -> torch.Tensor:
        """Real images from polar spectra: ``(..., R, T)`` complex -> ``(..., L, L)``."""
        lead = polar.shape[:-2]
        p = polar.reshape(-1, self.R, self.T)
        p = torch.cat([p, p[..., :1]], dim=-1)  # wrap the angle axis for interpolation
        channels = torch.stack([p.real, p.imag], 1)  # (M, 2, R, T + 1)
        cart = self._sample(channels, self.to_cartesian_grid)  # (M, 2, L, L)
        spec = torch.complex(cart[:, 0], cart[:, 1])
        return ifft2c(spec).real.reshape(*lead, self.L, self.L)
