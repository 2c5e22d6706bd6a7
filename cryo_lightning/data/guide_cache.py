"""Cached guides: slow per-set estimates (EM's posterior means) stored beside the recipes of the
synthetic sets they belong to, so that training can read them instead of recomputing them.

A synthetic set is reproducible from its recipe (seed, molecule, split) by the data module's
simulator, so the cache stores only the recipes and the guides, in shards
``DIR/<split>-<k>.pt`` = ``{"seed": (n,), "molecule": (n,), "guide": (n, N, L, L) float16}``,
and ``DIR/cache.json`` records what they were made from (box, simulation, molecule banks and the
guide's settings): a cache made for other data or another guide is refused, not silently used.
Shards are written whole (to a temporary name, then renamed), so a build that is stopped loses at
most the shard in progress and resumes after the last one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from cryo_lightning.data.molecule_bank import SPLITS

__all__ = ["GuideCache", "CachedRecipeStream"]


class GuideCache:
    """Read and append the guides of one directory.

    Args:
        directory: the cache folder.
        description: what the guides are made from (JSON-serialisable), e.g. ``{"data": ...,
            "guide": ...}``; each of its keys is compared with the folder's ``cache.json`` (a reader
            may give only ``"data"``), which a new folder gets from the first :meth:`append`.
    """

    def __init__(self, directory: str | Path, description: dict) -> None:
        self.directory = Path(directory)
        self.description = json.loads(json.dumps(description))  # as it reads back from JSON
        manifest = self.directory / "cache.json"
        if manifest.is_file():
            found = json.loads(manifest.read_text())
            differ = sorted(k for k in self.description if found.get(k) != self.description[k])
            if differ:
                raise ValueError(f"{manifest} was made for other data or another guide (differs in: "
                                 f"{', '.join(differ)}); use another folder or the settings it was made with")
        self._index: dict[int, tuple[Path, int]] | None = None
        self._shards: dict[Path, dict[str, torch.Tensor]] = {}

    def shards(self, split: str) -> list[Path]:
        return sorted(self.directory.glob(f"{split}-*.pt"))

    def recipes(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(seeds, molecules)`` of every cached set of ``split``, in the order they were made."""
        seeds, molecules = [], []
        for path in self.shards(split):
            shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            seeds.append(shard["seed"])
            molecules.append(shard["molecule"])
        if not seeds:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return torch.cat(seeds), torch.cat(molecules)

    def append(self, split: str, seeds: torch.Tensor, molecules: torch.Tensor, guides: torch.Tensor) -> Path:
        """Write one more shard of ``split``; returns its path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / "cache.json"
        if not manifest.is_file():
            manifest.write_text(json.dumps(self.description, indent=2))
        path = self.directory / f"{split}-{len(self.shards(split)):05d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"seed": seeds.long().cpu(), "molecule": molecules.long().cpu(),
                    "guide": guides.to(torch.float16).cpu()}, tmp)
        tmp.replace(path)
        self._index = None
        return path

    def guides(self, seeds: torch.Tensor) -> torch.Tensor:
        """``(B, N, L, L)`` float32 guides of the sets with these seeds (each must be cached)."""
        wanted = [int(s) for s in seeds.tolist()]
        if self._index is None or (any(s not in self._index for s in wanted) and self._has_new_shards()):
            self._read_index()  # first use, or shards written since (a build still running)
        missing = [s for s in wanted if s not in self._index]
        if missing:
            raise KeyError(f"sets with seeds {missing[:5]} are not in the guide cache {self.directory}")
        return torch.stack([self._shards[path]["guide"][row] for path, row in map(self._index.__getitem__, wanted)]).float()

    def _has_new_shards(self) -> bool:
        return any(path not in self._shards for split in SPLITS for path in self.shards(split))

    def _read_index(self) -> None:
        self._index = {}
        for split in SPLITS:
            for path in self.shards(split):
                if path not in self._shards:
                    self._shards[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                for row, seed in enumerate(self._shards[path]["seed"].tolist()):
                    self._index[seed] = (path, row)


class CachedRecipeStream(IterableDataset):
    """Streams the recipes ``{"seed", "molecule", "split"}`` of a cache's sets of one split.

    Training shuffles them anew every epoch (seeded by ``seed`` and the epoch) and reads the
    cache's list again each epoch, so sets that a build still running adds join the next epoch;
    evaluation keeps the cache's order and its first list. Sets are dealt round-robin to DDP
    ranks, each rank getting the same count.
    """

    def __init__(self, cache: GuideCache, split: str, seed: int, shuffle: bool) -> None:
        super().__init__()
        self.cache, self.split, self.seed, self.shuffle = cache, split, seed, shuffle
        self.rank, self.world_size, self.epoch = 0, 1, 0
        self._recipes: tuple[list[int], list[int]] | None = None

    def _all(self) -> tuple[list[int], list[int]]:
        if self._recipes is None:
            seeds, molecules = self.cache.recipes(self.split)
            if len(seeds) == 0:
                raise ValueError(f"the guide cache {self.cache.directory} holds no {self.split} sets: build them "
                                 f"with `cryol cache-guides ... --split {self.split}`")
            self._recipes = (seeds.tolist(), molecules.tolist())
        return self._recipes

    def __len__(self) -> int:
        return len(self._all()[0]) // self.world_size

    def __iter__(self) -> Iterator[dict[str, int]]:
        if self.shuffle:
            self._recipes = None
        seeds, molecules = self._all()
        order = list(range(len(seeds)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            self.epoch += 1
        for k in order[self.rank::self.world_size][: len(self)]:
            yield {"seed": seeds[k], "molecule": molecules[k], "split": SPLITS.index(self.split)}
