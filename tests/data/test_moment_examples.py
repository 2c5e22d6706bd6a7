"""Moment examples for the learned reconstructor (data/moment_examples.py)."""

from __future__ import annotations

import math

import pytest
import torch

from cryo_lightning.abinitio.moment_loss import moment_loss
from cryo_lightning.data.moment_examples import MomentDataModule


@pytest.fixture(scope="module")
def dm() -> MomentDataModule:
    return MomentDataModule(box=16, l_max=2, view_degree=2, batch_size=2, n_train_molecules=4, n_val_molecules=2,
                            train_examples=4, val_examples=2)


def _trace(m2, weights) -> float:
    return sum(float((weights[:, None] * torch.diagonal(t, dim1=-2, dim2=-1).real).sum()) for t in m2)


def test_exact_examples_are_deterministic_and_consistent(dm):
    ex = dm.example("train", 0, 1)
    again = dm.example("train", 0, 1)
    torch.testing.assert_close(ex["start"], again["start"], rtol=0, atol=0)
    torch.testing.assert_close(ex["view_coeffs"], again["view_coeffs"], rtol=0, atol=0)
    other_epoch = dm.example("train", 1, 1)
    assert not torch.equal(other_epoch["view_coeffs"], ex["view_coeffs"])  # new distribution each epoch
    loss = dm.loss_fn(ex["moments"])
    assert float(loss(ex["coeffs"], ex["view_coeffs"])) < 1e-26  # exact moments of the truth
    assert float(loss(ex["start"], ex["view_start"])) > 1e-2
    w = ex["moments"].weights
    with torch.no_grad():
        _, m2 = dm.moment_model(ex["start"], ex["view_start"])
    assert _trace(m2, w) == pytest.approx(_trace(ex["moments"].m2, w), rel=1e-10)  # start scaled to tr M2
    assert ex["view_start"].tolist() == [1.0] + [0.0] * (len(ex["view_start"]) - 1)
    assert dm.volume_irreps == dm.basis.layout.irreps()


def test_noisy_examples_approach_the_exact_moments():
    exact = MomentDataModule(box=16, l_max=2, view_degree=2, n_train_molecules=2)
    errors = []
    for n in (2_000, 32_000):
        noisy = MomentDataModule(box=16, l_max=2, view_degree=2, n_train_molecules=2, n_images=n, snr=0.5)
        ex = noisy.example("train", 0, 0)
        ref = exact.example("train", 0, 0)
        torch.testing.assert_close(ex["coeffs"], ref["coeffs"], rtol=0, atol=0)
        assert ex["moments"].counts.sum() == n and float(ex["moments"].noise_variance[0]) > 0
        errors.append(math.sqrt(float(moment_loss(exact.moment_model, ref["coeffs"], ex["view_coeffs"], ex["moments"],
                                                  use_m3=False))))
    assert errors[1] < 0.5 * errors[0]  # 1 / sqrt(16) expected
    assert errors[1] < 0.05


def test_loaders_yield_lists_of_examples(dm):
    batches = list(dm.train_dataloader())
    assert [len(b) for b in batches] == [2, 2]
    assert set(batches[0][0]) == {"coeffs", "view_coeffs", "moments", "start", "view_start"}
    assert len(list(dm.val_dataloader())) == 1


def test_loader_workers_make_each_example_once_and_advance_epochs():
    kwargs = dict(box=16, l_max=2, view_degree=2, batch_size=1, n_train_molecules=4, n_val_molecules=2,
                  train_examples=4, val_examples=2)
    serial = MomentDataModule(**kwargs)
    parallel = MomentDataModule(**kwargs, num_workers=2)

    def key(ex):
        return tuple(ex["view_coeffs"].tolist())

    loader = parallel.train_dataloader()
    epochs = [sorted(key(b[0]) for b in loader) for _ in range(2)]
    for epoch, seen in enumerate(epochs):
        assert seen == sorted(key(serial.example("train", epoch, i)) for i in range(4))
    assert epochs[0] != epochs[1]  # persistent workers move on to the next epoch's draws


def test_test_bank_holds_molecules_outside_train_and_val(dm):
    test = dm.example("test", 0, 0)["coeffs"]
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            assert not torch.allclose(dm.example(split, 0, i)["coeffs"], test)
