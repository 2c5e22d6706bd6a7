"""Polar set transformer: shapes, permutation equivariance over the set, in-plane rotation equivariance."""

from __future__ import annotations

import math

import pytest
import torch

from cryo_lightning.data.molecule_bank import MoleculeBank
from cryo_lightning.data.set_simulator import SetSimulator, SimulationConfig
from cryo_lightning.physics.polar import PolarSpectrum
from cryo_lightning.models.set_transformer import PolarSetTransformer


def _batch(L: int, N: int, snr: float = 0.5, ctf: bool = True) -> dict:
    sim = SetSimulator(MoleculeBank(L, "val", 2, 0), SimulationConfig(set_size=N, pixel_size=6.0, ctf=ctf, snr=(snr, snr)))
    return sim(torch.arange(2), torch.arange(2))


def test_polar_round_trip_and_rotation_is_a_shift():
    L = 33  # odd: rot90 turns about the centre index L // 2 exactly
    polar = PolarSpectrum(L, 33, 128)
    clean = _batch(L, 4)["clean"]
    back = polar.inverse(polar(clean))
    assert float((back - clean).norm() / clean.norm()) < 0.05
    rotated = torch.rot90(clean, 1, dims=(-2, -1))
    shifted = torch.roll(polar(clean), -32, dims=-1)  # a quarter turn = T / 4 samples
    assert float((shifted - polar(rotated)).abs().norm() / shifted.abs().norm()) < 1e-3


def test_shapes_and_any_set_size():
    model = PolarSetTransformer(L=32, n_angles=64, heads=2)
    for N in (1, 5, 16):
        b = _batch(32, N)
        out = model(b["noisy"], b["ctf"], b["noise_variance"])
        assert out.shape == (2, N, 32, 32) and torch.isfinite(out).all()
    assert model(b["noisy"]).shape == b["noisy"].shape  # CTF and noise variance optional


def test_permutation_equivariance():
    torch.manual_seed(0)
    model = PolarSetTransformer(L=32, n_angles=64, heads=2)
    b = _batch(32, 8)
    perm = torch.randperm(8)
    out = model(b["noisy"], b["ctf"], b["noise_variance"])
    out_perm = model(b["noisy"][:, perm], b["ctf"][:, perm], b["noise_variance"])
    torch.testing.assert_close(out_perm, out[:, perm], atol=1e-4, rtol=1e-4)


def test_in_plane_rotation_equivariance():
    """Rotating every input (and its CTF) by 90 degrees rotates every output by 90 degrees."""
    L = 33
    model = PolarSetTransformer(L=L, n_angles=64, heads=2)
    b = _batch(L, 6)
    out = model(b["noisy"], b["ctf"], b["noise_variance"])
    rot = lambda x: torch.rot90(x, 1, dims=(-2, -1))  # noqa: E731
    out_rot = model(rot(b["noisy"]), rot(b["ctf"]), b["noise_variance"])
    rel = float((out_rot - rot(out)).norm() / out.norm())
    assert rel < 1e-3, rel


def test_denoises_better_than_the_noisy_input_untrained():
    b = _batch(32, 16, snr=1 / 8)
    model = PolarSetTransformer(L=32)
    with torch.no_grad():
        out = model(b["noisy"], b["ctf"], b["noise_variance"])
    def rel(x):
        return float(((x - b["clean"]) ** 2).sum((-1, -2)).div((b["clean"] ** 2).sum((-1, -2))).mean())
    assert rel(out) < 0.7 < rel(b["noisy"])


def _check_equivariances(model, b, rotation_tolerance: float) -> None:
    """Permuting the set permutes the output; a quarter turn of every input turns every output."""
    out = model(b["noisy"], b["ctf"], b["noise_variance"])
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(b["noisy"][:, perm], b["ctf"][:, perm], b["noise_variance"]), out[:, perm],
                               atol=1e-4, rtol=1e-4)
    rot = lambda x: torch.rot90(x, 1, dims=(-2, -1))  # noqa: E731
    out_rot = model(rot(b["noisy"]), rot(b["ctf"]), b["noise_variance"])
    assert float((out_rot - rot(out)).norm() / out.norm()) < rotation_tolerance


def test_cwf_guide_keeps_equivariances():
    L = 33
    model = PolarSetTransformer(L=L, n_angles=64, heads=2, layers=1, guide="cwf")
    # the CWF basis lives on the pixel grid, so rotation equivariance holds up to its interpolation
    _check_equivariances(model, _batch(L, 6), 2e-2)


def test_refiner_keeps_equivariances_and_starts_as_the_set_estimate():
    L = 33
    plain = PolarSetTransformer(L=L, n_angles=64, heads=2, layers=1, guide="cwf")
    model = PolarSetTransformer(L=L, n_angles=64, heads=2, layers=1, guide="cwf", refine_channels=4)
    model.load_state_dict(plain.state_dict(), strict=False)
    model.eval()
    b = _batch(L, 6)
    with torch.no_grad():
        # The refiner's last layer starts at zero: the output is the set estimate.
        torch.testing.assert_close(model(b["noisy"], b["ctf"], b["noise_variance"]),
                                   plain.eval()(b["noisy"], b["ctf"], b["noise_variance"]))
        torch.nn.init.normal_(model.refiner.head.weight, std=0.1)  # a non-trivial refiner
        _check_equivariances(model, b, 2e-2)


def test_population_prior_is_fitted_once_and_saved():
    L = 33
    kwargs = dict(L=L, n_angles=64, heads=2, layers=1, guide="cwf")
    model = PolarSetTransformer(**kwargs, cwf_prior_strength=64, cwf_prior_tempering=0.1, cwf_prior_molecules=3)
    b = _batch(L, 6)
    assert model.needs_population
    with pytest.raises(RuntimeError, match="fit_population"):
        model(b["noisy"], b["ctf"], b["noise_variance"])
    train = _batch(L, 24)  # two molecules: too few
    with pytest.raises(ValueError, match="holds 3"):
        model.fit_population((train["clean"][m], train["ctf"][m]) for m in range(2))
    sim = SetSimulator(MoleculeBank(L, "train", 3, 0), SimulationConfig(set_size=32, pixel_size=6.0))
    train = sim(torch.arange(3), torch.arange(3))
    model.fit_population((train["clean"][m], train["ctf"][m]) for m in range(3))
    assert not model.needs_population
    with torch.no_grad():
        out = model(b["noisy"], b["ctf"], b["noise_variance"])
        plain = PolarSetTransformer(**kwargs)
        plain.load_state_dict(model.state_dict(), strict=False)
        assert not torch.allclose(out, plain(b["noisy"], b["ctf"], b["noise_variance"]))  # the prior is used
        restored = PolarSetTransformer(**kwargs, cwf_prior_strength=64, cwf_prior_tempering=0.1, cwf_prior_molecules=3)
        restored.load_state_dict(model.state_dict())  # the checkpoint carries the prior
        torch.testing.assert_close(restored(b["noisy"], b["ctf"], b["noise_variance"]), out)
        _check_equivariances(model, b, 2e-2)
    with pytest.raises(ValueError, match="guide='cwf'"):
        PolarSetTransformer(L=L, cwf_prior_strength=64)


def test_neighbour_weights_find_nearby_views_from_clean_queries():
    """The untrained layer already draws mostly from images of nearby viewing directions when it
    compares clean images: 0.84 of the mass within 30 degrees, where 7% of the images lie."""
    torch.manual_seed(0)
    model = PolarSetTransformer(L=33, n_angles=64, heads=2, layers=1)
    b = _batch(33, 48)
    w = model.neighbour_weights(b["noisy"], b["ctf"], b["noise_variance"], queries=b["clean"])
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 48))
    assert float(w.diagonal(dim1=1, dim2=2).abs().max()) == 0
    v = b["rotations"][..., 2, :]  # viewing directions
    near = ((v[:, :, None] * v[:, None]).sum(-1) > math.cos(math.radians(30))).float() - torch.eye(48)
    assert float((w * near).sum(-1).mean()) > 0.6 > 3 * float(near.sum(-1).mean() / 47)
    with pytest.raises(ValueError, match="layers = 0"):
        PolarSetTransformer(L=33, layers=0).neighbour_weights(b["noisy"])
