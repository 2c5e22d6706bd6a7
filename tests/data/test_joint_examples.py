"""JointDataModule (data/joint_examples.py): unit noise, the example's SNR, seeded, moments that match."""

from __future__ import annotations

import torch

from cryo_lightning.abinitio.image_moments import estimate_moments
from cryo_lightning.data.joint_examples import JointDataModule


def _dm(**kw) -> JointDataModule:
    args = dict(box=16, l_max=2, view_degree=2, n_images=256, set_size=32, snr=0.25, n_train_molecules=4,
                n_val_molecules=2, n_test_molecules=2, train_examples=8, val_examples=2)
    args.update(kw)
    return JointDataModule(**args)


def test_example_has_unit_noise_the_requested_snr_and_sets():
    dm = _dm()
    ex = dm.example("train", 0, 1)
    assert ex["noisy"].shape == ex["clean"].shape == ex["ctf"].shape == (8, 32, 16, 16)
    noise = (ex["noisy"] - ex["clean"]).double()
    # 65536 unit-variance samples: the variance is within 5 standard errors (5 * sqrt(2 / n)) of 1
    assert abs(float(noise.var()) - 1.0) < 5 * (2 / noise.numel()) ** 0.5
    # clean power inside the disk over the unit noise variance is the SNR by construction
    yy, xx = torch.meshgrid(torch.arange(16) - 8.0, torch.arange(16) - 8.0, indexing="ij")
    disk = (yy.square() + xx.square()) < 64  # physics.noise.disk_mask: strictly inside L / 2
    assert abs(float(ex["clean"][..., disk].double().square().mean()) / 0.25 - 1.0) < 1e-5
    # CTF of each image is its group's (group i mod G, images row-major over sets)
    flat_ctf = ex["ctf"].reshape(-1, 16, 16)
    torch.testing.assert_close(flat_ctf[ex["groups"] == 1][0], dm.group_ctfs[1])
    assert torch.equal(ex["groups"], torch.arange(256) % 2)


def test_examples_are_seeded_and_moments_are_those_of_the_noisy_images():
    dm = _dm()
    ex1, ex2 = dm.example("val", 0, 0), dm.example("val", 0, 0)
    assert torch.equal(ex1["noisy"], ex2["noisy"]) and torch.equal(ex1["coeffs"], ex2["coeffs"])
    assert not torch.equal(dm.example("val", 0, 1)["noisy"], ex1["noisy"])
    ref = estimate_moments(ex1["noisy"].reshape(-1, 16, 16).double(), dm.layout, groups=ex1["groups"],
                           noise_variance=1.0, n_groups=2, third=True)
    torch.testing.assert_close(ex1["moments"].m1, ref.m1)
    for got, want in zip(ex1["moments"].m2 + ex1["moments"].m3, ref.m2 + ref.m3):
        torch.testing.assert_close(got, want)


def test_image_moments_are_differentiable_in_the_images():
    dm = _dm(n_images=64)
    ex = dm.example("train", 0, 0)
    images = ex["clean"].double().requires_grad_(True)
    m = dm.image_moments(images, ex["groups"])
    (m.m2[0].real.sum() + m.m3[1].real.sum()).backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0


def test_train_targets_are_unit_power_clean_images_of_the_first_epoch():
    dm = _dm(n_images=64)
    pairs = list(dm.train_targets(2, max_images=64))
    assert len(pairs) == 2
    clean, ctf = pairs[0]
    assert clean.shape == ctf.shape == (64, 16, 16)
    torch.testing.assert_close(float(clean.double().square().mean()), 1.0, rtol=1e-5, atol=0)
    ex = dm.example("train", 0, 0)  # molecule 0's first example
    c = ex["clean"].reshape(-1, 16, 16)
    torch.testing.assert_close(clean, c / c.square().mean().sqrt())
