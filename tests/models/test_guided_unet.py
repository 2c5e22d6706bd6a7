"""Wiener-guided U-Net: starts as the Wiener filter, any box, and learns on top of it."""

from __future__ import annotations

import pytest
import torch

from cryo_lightning.data.set_simulator import SetSimulator, SimulationConfig
from cryo_lightning.data.molecule_bank import MoleculeBank
from cryo_lightning.denoise.wiener import wiener_denoise
from cryo_lightning.metrics import relative_mse
from cryo_lightning.models.guided_unet import GuidedUNet


def _batch(L: int = 32, N: int = 16, snr: float = 1 / 16, split: str = "val", seed: int = 0):
    sim = SetSimulator(MoleculeBank(L, split, 4, 0, family="structures", pixel_size_range=(3.0, 8.0)),
                       SimulationConfig(set_size=N, snr=(snr, snr), max_shift=2.0))
    return sim(torch.tensor([seed, seed + 1]), torch.tensor([0, 1]))


def test_untrained_model_is_the_wiener_filter():
    b = _batch()
    net = GuidedUNet(depth=2, channels=4)
    out = net(b["noisy"], b["ctf"], b["noise_variance"])
    torch.testing.assert_close(out, wiener_denoise(b["noisy"], b["ctf"], b["noise_variance"]))


@pytest.mark.parametrize("L", [30, 64])
def test_any_box_and_missing_ctf(L):
    net = GuidedUNet(depth=2, channels=4)
    x = torch.randn(1, 3, L, L)
    assert net(x).shape == x.shape


def test_a_few_steps_improve_on_the_wiener_guide():
    torch.manual_seed(0)
    net = GuidedUNet(depth=2, channels=8)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    test = _batch(split="test", seed=100)
    guide = relative_mse(wiener_denoise(test["noisy"], test["ctf"], test["noise_variance"]), test["clean"]).mean()
    for step in range(40):
        b = _batch(split="train", seed=2 * step)
        loss = torch.nn.functional.mse_loss(net(b["noisy"], b["ctf"], b["noise_variance"]), b["clean"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        learned = relative_mse(net(test["noisy"], test["ctf"], test["noise_variance"]), test["clean"]).mean()
    assert learned < 0.97 * guide


def test_cwf_guide_and_training_subset():
    from cryo_lightning.denoise.cwf import cwf_denoise

    b = _batch(N=24)
    net = GuidedUNet(depth=2, channels=4, guide="cwf", train_images=8)
    torch.nn.init.normal_(net.net.head.weight, std=0.1)
    guide = cwf_denoise(b["noisy"], b["ctf"], b["noise_variance"])
    net.train()
    out = net(b["noisy"], b["ctf"], b["noise_variance"])
    # only the first 8 images of each set are refined in training; the rest are the CWF guide
    torch.testing.assert_close(out[:, 8:], guide[:, 8:])
    assert not torch.allclose(out[:, :8], guide[:, :8])
    net.eval()
    with torch.no_grad():
        full = net(b["noisy"], b["ctf"], b["noise_variance"])
    # in evaluation every image is refined
    assert full.shape == b["noisy"].shape and not torch.allclose(full[:, 8:], guide[:, 8:])
    with pytest.raises(ValueError, match="guide"):
        GuidedUNet(guide="oracle")


def test_quarter_turns_make_the_output_rotate_with_the_input():
    """Averaged over the four quarter turns, the network commutes with them (odd box: rot90 keeps
    the centre pixel L // 2; the radial Wiener guide commutes with them by itself)."""
    torch.manual_seed(0)
    net = GuidedUNet(depth=2, channels=4, quarter_turns=True)
    torch.nn.init.normal_(net.net.head.weight, std=0.1)
    net.eval()
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        turned = net(torch.rot90(x, 1, (-2, -1)))
        plain = torch.rot90(net(x), 1, (-2, -1))
    torch.testing.assert_close(turned, plain, rtol=1e-4, atol=1e-5)
    net.quarter_turns = False
    with torch.no_grad():
        assert not torch.allclose(net(torch.rot90(x, 1, (-2, -1))), torch.rot90(net(x), 1, (-2, -1)), atol=1e-4)


def test_sure_blend_discounts_a_harmful_correction():
    """A network whose correction is noise (random head) is far worse than its guide; with the
    SURE weights, estimated from the noisy set alone, the output is back at the guide's error. A
    zero correction leaves the guide exactly (no 0/0)."""
    b = _batch(L=32, N=160, snr=1 / 8)
    net = GuidedUNet(depth=2, channels=4).eval()
    with torch.no_grad():
        guide = net(b["noisy"], b["ctf"], b["noise_variance"])
        net.sure_blend = True
        torch.testing.assert_close(net(b["noisy"], b["ctf"], b["noise_variance"]), guide)
        torch.nn.init.normal_(net.net.head.weight, std=30.0, generator=torch.Generator().manual_seed(0))
        net.sure_blend = False
        harmful = net(b["noisy"], b["ctf"], b["noise_variance"])
        net.sure_blend, net.sure_probes = True, 64
        blended = net(b["noisy"], b["ctf"], b["noise_variance"])
        again = net(b["noisy"], b["ctf"], b["noise_variance"])
    e_guide, e_harmful, e_blend = (float(relative_mse(x, b["clean"]).mean()) for x in (guide, harmful, blended))
    assert e_harmful > 1.5 * e_guide
    assert e_blend < 1.03 * e_guide, (e_guide, e_harmful, e_blend)
    torch.testing.assert_close(blended, again)  # the probe is seeded
    net.train()  # training is unaffected: the raw correction
    with torch.no_grad():
        trained = net(b["noisy"], b["ctf"], b["noise_variance"])
        net.sure_blend = False
        torch.testing.assert_close(net(b["noisy"], b["ctf"], b["noise_variance"]), trained)
    with pytest.raises(ValueError, match="sure_probes"):
        GuidedUNet(sure_probes=0)
