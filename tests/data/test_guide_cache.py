"""Guide cache: shards round-trip, a cache for other data is refused, and the data module streams
the cached sets with their guides attached."""

from __future__ import annotations

import pytest
import torch

from cryo_lightning.data.guide_cache import CachedRecipeStream, GuideCache
from cryo_lightning.data.set_simulator import SimulationConfig
from cryo_lightning.data.synthetic import SyntheticSetDataModule


def _module(tmp_path, **kwargs) -> SyntheticSetDataModule:
    return SyntheticSetDataModule(box=16, batch_size=2, simulation=SimulationConfig(set_size=6, snr=(0.1, 0.1)),
                                  n_train_molecules=8, n_val_molecules=2, n_test_molecules=2, val_sets=2,
                                  seed=3, **kwargs)


def test_shards_round_trip_and_guides_are_found_by_seed(tmp_path):
    cache = GuideCache(tmp_path / "c", {"data": {"box": 16}, "guide": {"iterations": 2}})
    g1, g2 = torch.randn(3, 6, 16, 16), torch.randn(2, 6, 16, 16)
    cache.append("train", torch.tensor([5, 9, 11]), torch.tensor([0, 1, 2]), g1)
    cache.append("train", torch.tensor([20, 21]), torch.tensor([3, 3]), g2)
    seeds, molecules = cache.recipes("train")
    assert seeds.tolist() == [5, 9, 11, 20, 21] and molecules.tolist() == [0, 1, 2, 3, 3]
    found = cache.guides(torch.tensor([21, 9]))
    torch.testing.assert_close(found, torch.stack([g2[1], g1[1]]).half().float())
    with pytest.raises(KeyError, match="not in the guide cache"):
        cache.guides(torch.tensor([4]))
    # a reader that checks the data alone accepts it; other data or another guide is refused
    GuideCache(tmp_path / "c", {"data": {"box": 16}})
    with pytest.raises(ValueError, match="differs in: guide"):
        GuideCache(tmp_path / "c", {"data": {"box": 16}, "guide": {"iterations": 8}})


def test_stream_shuffles_training_per_epoch_and_keeps_evaluation_order(tmp_path):
    cache = GuideCache(tmp_path, {"data": {}})
    cache.append("train", torch.arange(10), torch.arange(10) % 4, torch.zeros(10, 2, 4, 4))
    train = CachedRecipeStream(cache, "train", seed=0, shuffle=True)
    first, second = [r["seed"] for r in train], [r["seed"] for r in train]
    assert sorted(first) == list(range(10)) and first != second
    val = CachedRecipeStream(GuideCache(tmp_path, {"data": {}}), "train", seed=0, shuffle=False)
    assert [r["seed"] for r in val] == list(range(10))
    val.rank, val.world_size = 1, 3
    assert [r["seed"] for r in val] == [1, 4, 7]
    with pytest.raises(ValueError, match="holds no val sets"):
        list(CachedRecipeStream(cache, "val", seed=0, shuffle=False))


def test_data_module_attaches_the_cached_guides_of_its_own_sets(tmp_path):
    plain = _module(tmp_path)
    recipes = [plain.streams["val"].recipe(0, k) for k in range(2)]
    seeds = torch.tensor([r["seed"] for r in recipes])
    molecules = torch.tensor([r["molecule"] for r in recipes])
    guides = torch.randn(2, 6, 16, 16)
    GuideCache(tmp_path / "g", {"data": plain.description()}).append("val", seeds, molecules, guides)
    dm = _module(tmp_path, guide_cache=str(tmp_path / "g"))
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    reference = plain.simulate({"seed": seeds, "molecule": molecules, "split": torch.tensor([1, 1])})
    torch.testing.assert_close(batch["noisy"], reference["noisy"])
    torch.testing.assert_close(batch["guide"], guides.half().float())
    # the cache belongs to its data: another SNR range is refused with what differs
    with pytest.raises(ValueError, match="differs in: data"):
        SyntheticSetDataModule(box=16, simulation=SimulationConfig(set_size=6, snr=(0.2, 0.2)), seed=3,
                               n_train_molecules=8, n_val_molecules=2, n_test_molecules=2, val_sets=2,
                               guide_cache=str(tmp_path / "g"))


def test_sets_added_by_a_running_build_join_the_next_epoch(tmp_path):
    writer = GuideCache(tmp_path, {"data": {}})
    writer.append("train", torch.arange(4), torch.zeros(4), torch.zeros(4, 2, 4, 4))
    reader = GuideCache(tmp_path, {"data": {}})
    stream = CachedRecipeStream(reader, "train", seed=0, shuffle=True)
    assert sorted(r["seed"] for r in stream) == [0, 1, 2, 3]
    reader.guides(torch.tensor([1]))
    writer.append("train", torch.tensor([7, 8]), torch.zeros(2), torch.ones(2, 2, 4, 4))
    assert sorted(r["seed"] for r in stream) == [0, 1, 2, 3, 7, 8]
    assert float(reader.guides(torch.tensor([8, 0])).sum()) == 2 * 4 * 4
