"""U-Net denoiser: shapes for any box size, parameter count, and that it learns."""

from __future__ import annotations

import pytest
import torch

from cryo_lightning.models.unet import UNet


@pytest.mark.parametrize("L", [32, 33, 64])
def test_shape_is_preserved_for_any_box_and_leading_axes(L):
    torch.manual_seed(0)
    net = UNet(depth=3, channels=4)
    x = torch.randn(2, 3, L, L)
    y = net(x)
    assert y.shape == x.shape
    assert net(x[0, 0]).shape == (L, L)


def test_default_parameter_count_matches_docstring():
    assert sum(p.numel() for p in UNet().parameters()) == 1_926_433


def test_padding_keeps_pixels_aligned():
    # A 30-pixel image is padded by one pixel on each side to 32: the output must equal the
    # network's output on that 32-pixel canvas, cropped back at the same offset.
    torch.manual_seed(0)
    net = UNet(depth=3, channels=4).eval()
    x = torch.randn(2, 30, 30)
    canvas = torch.zeros(2, 32, 32)
    canvas[:, 1:31, 1:31] = x
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(canvas)[:, 1:31, 1:31])


def test_a_few_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    L = 16
    yy, xx = torch.meshgrid(torch.arange(L) - L // 2, torch.arange(L) - L // 2, indexing="ij")
    centres = torch.randint(-3, 4, (32, 2))
    clean = torch.exp(-((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2) / 8.0)
    noisy = clean + 0.5 * torch.randn_like(clean)
    net = UNet(depth=2, channels=8)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (net(noisy) - clean).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
