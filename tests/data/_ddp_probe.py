"""Helper of test_ddp.py: one epoch of a tiny model that records what its rank saw.

Run as a script by each DDP rank (the test starts the ranks itself with LOCAL_RANK/NODE_RANK/
MASTER_* set, so both runs share one pair of processes); imported by the test for the
single-process reference runs.

    python _ddp_probe.py OUT_DIR STAR_PATH
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from cryo_lightning.data.particles import ParticleDataModule
from cryo_lightning.data.preprocess import PreprocessConfig
from cryo_lightning.data.set_simulator import SimulationConfig
from cryo_lightning.data.synthetic import SyntheticSetDataModule

SETS_PER_EPOCH = 16  # synthetic; particles: 32 particles in sets of 4 = 8 sets


class Probe(pl.LightningModule):
    """A 3x3 convolution fitted by SGD; records (step, ids, loss) per training step."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.net = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.out, self.records = Path(out), []

    def training_step(self, batch, batch_idx):
        noisy = batch["noisy"]  # (B, N, L, L)
        target = batch.get("clean", torch.zeros_like(noisy))
        loss = torch.nn.functional.mse_loss(self.net(noisy.flatten(0, 1)[:, None]).reshape(noisy.shape), target)
        ids = batch["seed"] if "seed" in batch else batch["particle_id"][:, 0]  # one id per set
        self.records.append({"step": int(self.global_step), "ids": ids.tolist(), "loss": loss.detach().item()})
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def on_train_end(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(self.records))


def synthetic(batch_size: int) -> SyntheticSetDataModule:
    simulation = SimulationConfig(set_size=4, pixel_size=6.0)
    return SyntheticSetDataModule(box=16, batch_size=batch_size, simulation=simulation, n_train_molecules=4,
                                  n_val_molecules=2, n_test_molecules=2, train_sets_per_epoch=SETS_PER_EPOCH, seed=3)


def particles(star: str, batch_size: int) -> ParticleDataModule:
    return ParticleDataModule(star, set_size=4, batch_size=batch_size, val_fraction=0.0, num_workers=0,
                              preprocess=PreprocessConfig(normalize=False), seed=0)


def as_if_distributed(dm: ParticleDataModule) -> ParticleDataModule:
    """Give a single process the sampler Lightning gives each DDP rank (seeded by
    ``seed_everything``), with one replica: the same global order of sets."""
    make = dm.train_dataloader

    def train_dataloader() -> DataLoader:
        loader = make()
        sampler = DistributedSampler(loader.dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn)

    dm.train_dataloader = train_dataloader
    return dm


def fit(dm: pl.LightningDataModule, out: Path, devices: int) -> None:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Probe(out), datamodule=dm)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, star = Path(sys.argv[1]), sys.argv[2]
    fit(synthetic(batch_size=2), out / "synthetic", devices=2)
    fit(particles(star, batch_size=2), out / "particles", devices=2)
    # Tear the gloo group down before the interpreter exits: a live group's threads at exit
    # occasionally abort the process ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
