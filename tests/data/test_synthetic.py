"""Synthetic set stream: sharding across ranks and workers, reproducibility, SNR, disjoint splits."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from cryo_lightning.data.set_simulator import SimulationConfig
from cryo_lightning.data.synthetic import SetRecipeStream, SyntheticSetDataModule
from cryo_lightning.physics.noise import empirical_snr, signal_power


def _seeds(stream: SetRecipeStream, num_workers: int = 0) -> list[int]:
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    return [int(r["seed"]) for r in loader]


def _ranked(rank: int, world: int, seed: int = 0) -> SetRecipeStream:
    stream = SetRecipeStream("train", n_sets=64, n_molecules=10, seed=seed, vary_per_epoch=True)
    stream.rank, stream.world_size = rank, world
    return stream


def test_ddp_ranks_stream_disjoint_sets_of_equal_length():
    r0, r1 = _seeds(_ranked(0, 2)), _seeds(_ranked(1, 2))
    assert len(r0) == len(r1) == 32  # equal per-rank length: DDP cannot hang
    assert not set(r0) & set(r1)
    assert set(r0) | set(r1) == set(_seeds(_ranked(0, 1)))  # together: the single-process epoch


def test_workers_stream_disjoint_sets():
    stream = _ranked(0, 1)
    with_workers = _seeds(stream, num_workers=2)
    assert len(with_workers) == len(set(with_workers)) == 64
    assert set(with_workers) == set(_seeds(_ranked(0, 1)))


def test_same_seed_same_sets_and_new_sets_each_epoch():
    a, b = _ranked(0, 1, seed=7), _ranked(0, 1, seed=7)
    epoch0 = _seeds(a)
    assert epoch0 == _seeds(b)
    assert not set(_seeds(a)) & set(epoch0)  # the next pass is a new epoch
    assert epoch0 != _seeds(_ranked(0, 1, seed=8))


def _datamodule(**sim) -> SyntheticSetDataModule:
    config = SimulationConfig(set_size=16, pixel_size=6.0, **sim)
    return SyntheticSetDataModule(box=32, batch_size=3, simulation=config, n_train_molecules=4,
                                  n_val_molecules=2, n_test_molecules=2, train_sets_per_epoch=6, seed=3)


def test_simulated_batch_shapes_and_reproducibility():
    dm = _datamodule(max_shift=2.0, viewing="vmf")
    recipes = next(iter(dm.val_dataloader()))
    a = dm.on_after_batch_transfer(recipes, 0)
    b = dm.on_after_batch_transfer(recipes, 0)
    assert a["noisy"].shape == a["clean"].shape == (3, 16, 32, 32)
    assert a["rotations"].shape == (3, 16, 3, 3) and a["origins"].shape == (3, 16, 2)
    assert a["origins"].abs().max() <= 2.0
    torch.testing.assert_close(a["noisy"], b["noisy"], rtol=0, atol=0)
    torch.testing.assert_close(a["clean"], b["clean"], rtol=0, atol=0)
    eye = torch.eye(3).expand(3, 16, 3, 3)
    torch.testing.assert_close(a["rotations"] @ a["rotations"].transpose(-1, -2), eye, atol=1e-5, rtol=0)


def test_empirical_snr_within_five_percent():
    for snr in (1 / 4, 1 / 32, 1 / 100):
        dm = _datamodule(snr=(snr, snr))
        batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
        measured = empirical_snr(batch["clean"], batch["noisy"])  # (B,)
        assert torch.all((measured / snr - 1).abs() < 0.05), (snr, measured)
        # images are in units of the noise standard deviation
        assert abs(float((batch["noisy"] - batch["clean"]).std()) - 1.0) < 0.02
        torch.testing.assert_close(signal_power(batch["clean"]), torch.full((3,), snr), rtol=1e-4, atol=0)


def test_snr_range_is_respected():
    dm = _datamodule(snr=(0.01, 0.1))
    snrs = torch.cat([dm.on_after_batch_transfer(r, 0)["snr"] for r in dm.train_dataloader()])
    assert torch.all((snrs >= 0.01) & (snrs <= 0.1)) and snrs.std() > 0


def test_splits_have_disjoint_molecules():
    dm = _datamodule()
    train = torch.stack([dm.banks["train"][i] for i in range(4)])
    others = torch.stack([dm.banks[s][i] for s in ("val", "test") for i in range(2)])
    diff = (train[:, None] - others[None]).flatten(2).abs().amax(-1)
    assert diff.min() > 0.1


def test_checkpoint_state_keeps_the_training_epoch():
    dm = _datamodule()
    list(dm.train_dataloader())
    list(dm.train_dataloader())
    fresh = _datamodule()
    fresh.load_state_dict(dm.state_dict())
    assert fresh.streams["train"].epoch == 2
    assert _seeds(fresh.streams["train"]) == _seeds(dm.streams["train"])


def test_list_of_set_sizes_varies_between_batches():
    dm = _datamodule()
    dm.simulation.set_size = [4, 8]
    dm.streams["train"].n_sets = 30  # ten batches
    sizes = {dm.on_after_batch_transfer(r, 0)["noisy"].shape[1] for r in dm.train_dataloader()}
    assert sizes == {4, 8}


def test_structure_banks_give_each_molecule_its_pixel_size_and_ctf():
    """With pixel_size_range, each molecule's CTF is simulated at its own pixel size, and the
    realistic CTF ranges (B-factor, amplitude contrast, voltage) are respected."""
    from cryo_lightning.physics.ctf import ctf_2d

    config = SimulationConfig(set_size=4, snr=(0.1, 0.1), bfactor=(20.0, 150.0), amplitude_contrast=(0.05, 0.15),
                              voltages=(200.0, 300.0), max_shift=2.0, defocus_range=(5000.0, 35000.0))
    dm = SyntheticSetDataModule(box=32, batch_size=4, simulation=config, n_train_molecules=8, n_val_molecules=4,
                                n_test_molecules=2, seed=5, molecules="structures", pixel_size_range=(1.5, 12.0))
    bank = dm.banks["val"]
    sizes = [bank.pixel_size(i) for i in range(len(bank))]
    assert all(1.5 <= p <= 12.0 for p in sizes) and len(set(sizes)) == len(sizes)
    assert sizes == [dm.banks["val"].pixel_size(i) for i in range(len(bank))]  # from the seed
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    pix = batch["pixel_size"]
    assert pix.shape == (4,)
    torch.testing.assert_close(pix, torch.tensor([sizes[int(m)] for m in batch["molecule"]]), rtol=1e-6, atol=0)
    p = batch["ctf_params"]
    assert float(p.bfactor.min()) >= 20.0 and float(p.bfactor.max()) <= 150.0
    assert float(p.amplitude_contrast.min()) >= 0.05 and float(p.amplitude_contrast.max()) <= 0.15
    assert set(p.voltage.unique().tolist()) <= {200.0, 300.0}
    # the batch's CTF is RELION's CTF of those parameters at each molecule's pixel size
    torch.testing.assert_close(batch["ctf"], ctf_2d(p, 32, pix[:, None]), rtol=0, atol=1e-6)
    assert torch.isfinite(batch["noisy"]).all()


def test_fixed_pixel_size_configs_keep_their_float_pixel_size():
    batch = _datamodule().on_after_batch_transfer(next(iter(_datamodule().val_dataloader())), 0)
    assert batch["pixel_size"] == 6.0
