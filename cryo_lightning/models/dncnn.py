"""DnCNN: a residual single-image denoiser (Zhang et al. 2017, IEEE TIP 26:3142)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DnCNN"]


class DnCNN(nn.Module):
    """``depth`` 3x3 convolutions that predict the noise, subtracted from the input.

    Images are denoised one at a time: a set ``(B, N, L, L)`` is treated as ``B * N`` images.
    The paper's network is ``depth=17, channels=64``.

    Args:
        depth: number of convolution layers (>= 2).
        channels: feature channels of the hidden layers.
    """

    def __init__(self, depth: int = 17, channels: int = 64) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(channels, 1, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(..., L, L)`` noisy -> ``(..., L, L)`` denoised (same shape)."""
        shape = images.shape
        x = images.reshape(-1, 1, shape[-2], shape[-1])
        return (x - self.body(x)).reshape(shape)
