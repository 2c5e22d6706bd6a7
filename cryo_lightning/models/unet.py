"""U-Net: a multi-scale single-image denoiser (Ronneberger, Fischer & Brox 2015, MICCAI)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet"]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU layers (the bias is redundant before batch norm)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Encoder-decoder with skip connections that predicts the noise, subtracted from the input.

    Level ``d`` (``0 <= d <= depth``) works at resolution ``L / 2**d`` with ``channels * 2**d``
    features: max-pooling goes down, a stride-2 transposed convolution goes up, and the decoder
    concatenates the encoder features of the same level. The output is residual,
    ``x - net(x)``, as in DnCNN: at low SNR the input is mostly noise, and a network initialised
    near zero starts from the identity rather than from a blank image.

    Images are denoised one at a time: a set ``(B, N, L, L)`` is treated as ``B * N`` images. Any
    ``L`` works: images are zero-padded (symmetrically) to a multiple of ``2**depth`` and the
    output is cropped back.

    The defaults (``depth=3, channels=32``) have 1,926,433 parameters.

    Args:
        depth: number of down-sampling steps (>= 1).
        channels: feature channels at full resolution.
        in_channels: input channels of :meth:`correction` (``forward`` uses one).
    """

    def __init__(self, depth: int = 3, channels: int = 32, in_channels: int = 1) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        widths = [channels * 2**d for d in range(depth + 1)]
        self.down = nn.ModuleList([_block(in_channels, widths[0])])
        self.down.extend(_block(widths[d - 1], widths[d]) for d in range(1, depth + 1))
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[d], widths[d - 1], 2, stride=2)
                                for d in range(depth, 0, -1))
        self.merge = nn.ModuleList(_block(2 * widths[d - 1], widths[d - 1]) for d in range(depth, 0, -1))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for d, block in enumerate(self.down):
            x = block(x if d == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output for ``(M, in_channels, H, W)`` inputs: ``(M, 1, H, W)``."""
        H, W = x.shape[-2:]
        m = 2**self.depth
        ph, pw = -H % m, -W % m
        top, left = ph // 2, pw // 2
        padded = F.pad(x, (left, pw - left, top, ph - top))
        return self._net(padded)[..., top : top + H, left : left + W]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(..., L, L)`` noisy -> ``(..., L, L)`` denoised (same shape)."""
        shape = images.shape
        x = images.reshape(-1, 1, *shape[-2:])
        return (x - self.correction(x)).reshape(shape)
