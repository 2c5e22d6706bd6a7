"""LightningDataModule streaming synthetic sets of projection images, generated on the device.

The DataLoader only streams *recipes* (a seed and a molecule index per set); the images are made
in :meth:`SyntheticSetDataModule.on_after_batch_transfer`, i.e. on the training device (GPU when
present) after the recipe batch has been moved there. Recipes are sharded by DDP rank and
DataLoader worker, so every rank and worker streams different sets, and a seed always streams the
same sets.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cryo_lightning.data.guide_cache import CachedRecipeStream, GuideCache
from cryo_lightning.data.molecule_bank import SPLITS, MoleculeBank, derive_seed
from cryo_lightning.data.set_simulator import SetSimulator, SimulationConfig

__all__ = ["SetRecipeStream", "SyntheticSetDataModule"]


class SetRecipeStream(IterableDataset):
    """Streams ``{"seed", "molecule", "split"}`` recipes for ``n_sets`` sets per epoch.

    Every rank gets ``n_sets // world_size`` sets, so all ranks yield the same number of batches
    and DDP cannot hang (an epoch has up to ``world_size - 1`` sets fewer). Set indices (which
    seed the sets) are dealt in blocks of ``block``, the per-device batch size: block ``k`` goes
    to rank ``k % world_size`` and, within a rank, blocks go round-robin to DataLoader workers.
    So the sets of DDP step ``s`` over all ranks are exactly those of step ``s`` of a single
    process with batch size ``block * world_size``, and workers never reorder batches.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        n_sets: sets per epoch over all ranks.
        n_molecules: size of the split's molecule bank.
        seed: base seed.
        vary_per_epoch: draw new sets every epoch (training) or repeat the same ones (evaluation).
        block: sets dealt together to one rank and worker (the per-device batch size).
    """

    def __init__(self, split: str, n_sets: int, n_molecules: int, seed: int, vary_per_epoch: bool,
                 block: int = 1) -> None:
        super().__init__()
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.split, self.n_sets, self.n_molecules = split, n_sets, n_molecules
        self.seed, self.vary_per_epoch, self.block = seed, vary_per_epoch, block
        self.rank, self.world_size = 0, 1
        self.epoch = 0  # advanced on every pass when vary_per_epoch

    def __len__(self) -> int:
        return self.n_sets // self.world_size

    def recipe(self, epoch: int, index: int) -> dict[str, int]:
        """The recipe of global set ``index`` in ``epoch``."""
        s = derive_seed(self.seed, SPLITS.index(self.split), epoch, index)
        return {"seed": s, "molecule": s % self.n_molecules, "split": SPLITS.index(self.split)}

    def __iter__(self) -> Iterator[dict[str, int]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch if self.vary_per_epoch else 0
        if self.vary_per_epoch:
            self.epoch += 1
        b, world = self.block, self.world_size
        for j in range(len(self)):  # the rank's j-th set
            local_block, offset = divmod(j, b)
            if local_block % n_workers == worker:
                yield self.recipe(epoch, (local_block * world + self.rank) * b + offset)


class SyntheticSetDataModule(pl.LightningDataModule):
    """Sets of ``N`` noisy projections of one molecule with their clean, CTF-affected targets.

    Batches are dicts (see :class:`~cryo_lightning.data.set_simulator.SetSimulator`) with
    ``noisy``/``clean`` ``(B, N, L, L)``; ``batch_size`` is per device.

    Args:
        box: image and volume size ``L`` (pixels).
        batch_size: sets per batch, per device.
        simulation: how images are drawn (set size, pixel size, SNR range, CTF, shifts, viewing).
        n_train_molecules, n_val_molecules, n_test_molecules: procedural molecules per split
            (disjoint by construction).
        train_sets_per_epoch, val_sets, test_sets: sets per epoch over all ranks.
        seed: base seed for molecules and sets.
        num_workers: DataLoader workers (recipes are tiny, so 0 is usually best).
        molecules: the procedural family of the banks, ``"beads"`` (sparse bead chains) or
            ``"structures"`` (realistic families: globular, elongated, flat, hollow, multi-domain,
            symmetric, ribosome-like; see ``cryo_lightning.physics.structures``).
        pixel_size_range: ``(low, high)`` Angstrom/px: each molecule gets its own pixel size,
            log-uniform in the range (its CTF is simulated at it); None: ``simulation.pixel_size``.
        diameter: molecule diameter range as a fraction of the box (``"structures"``).
        guide_cache: a folder made by ``cryol cache-guides`` for this data: training and
            validation then stream its sets (their recipes), and each batch gets its cached
            ``guide`` ``(B, N, L, L)``; None: sets drawn as usual, no guide.
    """

    def __init__(
        self,
        box: int = 32,
        batch_size: int = 4,
        simulation: SimulationConfig | None = None,
        n_train_molecules: int = 64,
        n_val_molecules: int = 8,
        n_test_molecules: int = 8,
        train_sets_per_epoch: int = 256,
        val_sets: int = 32,
        test_sets: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        molecules: str = "beads",
        pixel_size_range: tuple[float, float] | None = None,
        diameter: tuple[float, float] = (0.3, 0.95),
        guide_cache: str | None = None,
    ) -> None:
        super().__init__()
        self.box, self.batch_size, self.seed, self.num_workers = box, batch_size, seed, num_workers
        self.simulation = simulation if simulation is not None else SimulationConfig()
        counts = {"train": n_train_molecules, "val": n_val_molecules, "test": n_test_molecules}
        self.pixel_size_range = tuple(pixel_size_range) if pixel_size_range is not None else None
        self.banks = {s: MoleculeBank(box, s, counts[s], seed, family=molecules, pixel_size_range=self.pixel_size_range,
                                      diameter=tuple(diameter)) for s in SPLITS}
        self.simulators = {s: SetSimulator(self.banks[s], self.simulation) for s in SPLITS}
        self.streams = {
            "train": SetRecipeStream("train", train_sets_per_epoch, n_train_molecules, seed, True, batch_size),
            "val": SetRecipeStream("val", val_sets, n_val_molecules, seed, False, batch_size),
            "test": SetRecipeStream("test", test_sets, n_test_molecules, seed, False, batch_size),
        }
        self.set_counts = {"train": train_sets_per_epoch, "val": val_sets, "test": test_sets}
        self._description = {
            "box": box, "seed": seed, "molecules": molecules, "counts": counts,
            "pixel_size_range": self.pixel_size_range, "diameter": tuple(diameter),
            "simulation": {k: v for k, v in vars(self.simulation).items()},
        }
        self.guide_cache = None
        if guide_cache is not None:
            self.guide_cache = GuideCache(guide_cache, {"data": self.description()})
            self.streams["train"] = CachedRecipeStream(self.guide_cache, "train", seed, shuffle=True)
            self.streams["val"] = CachedRecipeStream(self.guide_cache, "val", seed, shuffle=False)

    def description(self) -> dict:
        """What the sets are drawn from (JSON-ready): a guide cache is valid only for the same."""
        return json.loads(json.dumps(self._description))

    @property
    def set_size(self) -> int:
        return self.simulation.set_size

    @property
    def pixel_size(self) -> float:
        return self.simulation.pixel_size

    def setup(self, stage: str | None = None) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            for stream in self.streams.values():
                stream.rank, stream.world_size = trainer.global_rank, trainer.world_size

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.streams[split], batch_size=self.batch_size, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,  # keeps each worker's epoch counter
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    def simulate(self, recipes: dict[str, torch.Tensor], device: torch.device | str | None = None) -> dict[str, Any]:
        """Images for a batch of recipes (all from one split), on ``device``."""
        splits = recipes["split"].unique()
        if len(splits) != 1:
            raise ValueError("a recipe batch must come from one split")
        simulator = self.simulators[SPLITS[int(splits[0])]]
        batch = simulator(recipes["seed"], recipes["molecule"], device=device)
        if self.guide_cache is not None and SPLITS[int(splits[0])] != "test":
            guide = self.guide_cache.guides(recipes["seed"].cpu()).to(batch["noisy"])
            if guide.shape != batch["noisy"].shape:
                raise ValueError(f"the guide cache {self.guide_cache.directory} holds sets of shape {tuple(guide.shape[1:])} "
                                 f"but the simulator made {tuple(batch['noisy'].shape[1:])}: the set size "
                                 "(simulation.set_size) must be the one the cache was built with")
            batch["guide"] = guide
        return batch

    @torch.no_grad()
    def train_targets(self, molecules: int, max_images: int = 1024,
                      device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Clean targets and CTFs of the first training epoch, molecule by molecule.

        These are exactly images that training streams (the first epoch's sets, over all ranks),
        so statistics fitted to them add no data beyond the training budget. Each set is divided
        by the square root of its SNR, which puts sets drawn at different SNRs on one scale
        (unit signal variance per set).

        Args:
            molecules: how many training molecules (those of lowest index that the epoch shows).
            max_images: stop collecting a molecule's sets once it has this many images.
            device: where to simulate (default CPU).
        Yields:
            per molecule, ``(n, L, L)`` clean CTF-affected images and ``(n, L, L)`` centred CTFs.
        """
        stream = self.streams["train"]
        seeds: dict[int, list[int]] = {}
        for index in range(stream.n_sets):
            recipe = stream.recipe(0, index)
            seeds.setdefault(recipe["molecule"], []).append(recipe["seed"])
        if len(seeds) < molecules:
            raise ValueError(f"{molecules} prior molecules asked for, but the first training epoch "
                             f"({stream.n_sets} sets) shows only {len(seeds)} of the {stream.n_molecules} "
                             "training molecules; raise train_sets_per_epoch or lower the number of prior molecules")
        device = torch.device(device) if device is not None else torch.device("cpu")
        simulator = self.simulators["train"]
        for m in sorted(seeds)[:molecules]:
            clean, ctf, count = [], [], 0
            for seed in seeds[m]:
                batch = simulator(torch.tensor([seed], device=device), torch.tensor([m], device=device), device=device)
                clean.append(batch["clean"][0] / batch["snr"][0].sqrt())
                ctf.append(batch["ctf"][0])
                count += clean[-1].shape[0]
                if count >= max_images:
                    break
            yield torch.cat(clean), torch.cat(ctf)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "seed" in batch and "noisy" not in batch:
            return self.simulate(batch, device=batch["seed"].device)
        return batch

    def state_dict(self) -> dict[str, int]:
        # Resuming continues with new training sets rather than replaying epoch 0's.
        return {"train_epoch": self.streams["train"].epoch}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.streams["train"].epoch = int(state_dict.get("train_epoch", 0))
