"""Rotational set transformer: equivariances (set order, in-plane rotation), any set size,
linear memory in N, and a short training run that lowers the validation error."""

from __future__ import annotations

import pytest
import torch

from cryo_lightning.data.molecule_bank import MoleculeBank
from cryo_lightning.data.set_simulator import SetSimulator, SimulationConfig
from cryo_lightning.models.rotational_transformer import RotationalSetTransformer

SMALL = dict(channels=8, heads=2, head_dim=4, layers=2, classes=6, hidden=8)


def _batch(L: int, N: int, snr: float = 0.5, split: str = "val", seed: int = 0) -> dict:
    sim = SetSimulator(MoleculeBank(L, split, 2, 0), SimulationConfig(set_size=N, pixel_size=6.0, ctf=True,
                                                                       snr=(snr, snr)))
    return sim(torch.arange(2) + seed, torch.arange(2))


def test_shapes_any_set_size_and_optional_inputs():
    torch.manual_seed(0)
    model = RotationalSetTransformer(L=32, **SMALL)
    for N in (1, 5, 16):
        b = _batch(32, N)
        out = model(b["noisy"], b["ctf"], b["noise_variance"])
        assert out.shape == (2, N, 32, 32) and torch.isfinite(out).all()
    assert model(b["noisy"]).shape == b["noisy"].shape


@torch.no_grad()
@pytest.mark.parametrize("guide", ["none", "cwf"])
def test_permutation_equivariance_over_the_set(guide):
    torch.manual_seed(0)
    model = RotationalSetTransformer(L=32, guide=guide, **SMALL)
    b = _batch(32, 9)
    perm = torch.randperm(9)
    out = model(b["noisy"], b["ctf"], b["noise_variance"])
    out_perm = model(b["noisy"][:, perm], b["ctf"][:, perm], b["noise_variance"])
    torch.testing.assert_close(out_perm, out[:, perm], atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("guide", ["none", "cwf"])
def test_in_plane_rotation_equivariance_of_all_images_and_of_one(guide):
    """Quarter turns are exact shifts of the polar grid (odd L turns about the centre pixel), so
    the outputs rotate with the inputs to float precision; rotating one image of the set rotates
    its output only (the others see it at whatever angle it has)."""
    torch.manual_seed(0)
    L = 33
    model = RotationalSetTransformer(L=L, guide=guide, **SMALL)
    if guide == "cwf":  # the guide's weight starts at 0.5: make it matter more than at init
        model.guide_weight.data.fill_(2.0)
    b = _batch(L, 6)
    rot = lambda x: torch.rot90(x, 1, dims=(-2, -1))  # noqa: E731
    out = model(b["noisy"], b["ctf"], b["noise_variance"])
    out_rot = model(rot(b["noisy"]), rot(b["ctf"]), b["noise_variance"])
    assert float((out_rot - rot(out)).norm() / out.norm()) < 1e-4
    noisy, ctf = b["noisy"].clone(), b["ctf"].clone()
    noisy[:, 2], ctf[:, 2] = rot(noisy[:, 2]), rot(ctf[:, 2])
    expected = out.clone()
    expected[:, 2] = rot(out[:, 2])
    assert float((model(noisy, ctf, b["noise_variance"]) - expected).norm() / out.norm()) < 1e-4


def test_attention_memory_grows_linearly_with_the_set():
    """Attention runs through the class tokens: its tensors are (N, classes, T), never (N, N, T)."""
    model = RotationalSetTransformer(L=32, **SMALL)
    x = torch.randn(1, 64, 32, 32)
    _, attention = model(x, return_attention=True)
    assert attention[0].shape == (1, SMALL["heads"], 64, SMALL["classes"], model.T)
    weights = model.neighbour_weights(x)
    assert weights.shape == (1, 64, 64)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 64), atol=1e-4, rtol=0)


def test_a_short_training_run_lowers_the_validation_error():
    torch.manual_seed(0)
    model = RotationalSetTransformer(L=32, **SMALL)
    val = _batch(32, 16, snr=0.25, split="val")

    def val_error() -> float:
        with torch.no_grad():
            out = model(val["noisy"], val["ctf"], val["noise_variance"])
        return float((out - val["clean"]).square().sum() / val["clean"].square().sum())

    before = val_error()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):
        b = _batch(32, 16, snr=0.25, split="train", seed=100 + 2 * step)
        loss = (model(b["noisy"], b["ctf"], b["noise_variance"]) - b["clean"]).square().mean() / b["noise_variance"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = val_error()
    print(f"validation relative MSE {before:.3f} -> {after:.3f}")
    assert after < 0.6 * before and after < 0.9, (before, after)


@torch.no_grad()
def test_embedding_is_rotation_invariant_and_needs_no_set():
    torch.manual_seed(0)
    L = 33
    model = RotationalSetTransformer(L=L, **SMALL)
    b = _batch(L, 8)
    images, ctf = b["noisy"][0], b["ctf"][0]
    e = model.embedding(images, ctf, b["noise_variance"][0])
    assert e.shape == (8, SMALL["heads"] * SMALL["classes"])
    torch.testing.assert_close(e.norm(dim=1), torch.ones(8))
    rot = lambda x: torch.rot90(x, 1, dims=(-2, -1))  # noqa: E731
    torch.testing.assert_close(model.embedding(rot(images), rot(ctf), b["noise_variance"][0]), e,
                               atol=1e-5, rtol=1e-4)
    # one image's embedding does not depend on the others given with it
    torch.testing.assert_close(model.embedding(images[:3], ctf[:3], b["noise_variance"][0]), e[:3],
                               atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_em_guide_computed_or_given_and_equivariant_given_it():
    """guide='em': the model runs EM with its own settings when no guide is given (what a cache
    stores), and the network is exactly permutation-equivariant given the guide."""
    torch.manual_seed(0)
    model = RotationalSetTransformer(L=16, guide="em", em_iterations=1, em_rotations=300, em_max_shift=1.0, **SMALL)
    b = _batch(16, 8, snr=1.0)
    guide = model.em_guide(b["noisy"], b["ctf"], b["noise_variance"])
    assert guide.shape == b["noisy"].shape and torch.isfinite(guide).all() and guide.abs().sum() > 0
    computed = model(b["noisy"], b["ctf"], b["noise_variance"])
    given = model(b["noisy"], b["ctf"], b["noise_variance"], guide=guide)
    torch.testing.assert_close(computed, given)
    perm = torch.randperm(8)
    out_perm = model(b["noisy"][:, perm], b["ctf"][:, perm], b["noise_variance"], guide=guide[:, perm])
    torch.testing.assert_close(out_perm, given[:, perm], atol=1e-5, rtol=1e-4)
    # the guide matters: it is an input and a skip
    other = model(b["noisy"], b["ctf"], b["noise_variance"], guide=torch.zeros_like(guide))
    assert float((other - given).norm()) > 1e-3 * float(given.norm())
    # a set of one image makes no map: a zero guide, not an error
    assert model.em_guide(b["noisy"][:, :1]).abs().sum() == 0
