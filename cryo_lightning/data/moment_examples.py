"""Training examples for the learned moment reconstructor: molecules, viewing distributions, moments.

Each example is a molecule of a :class:`~cryo_lightning.data.molecule_bank.MoleculeBank` split
(SFB coefficients ``a``), a random non-uniform viewing distribution ``b``
(:meth:`SHViewingDistribution.random`), the moments of its images (exact, or debiased moments of
``n_images`` noisy CTF-affected images at ``snr`` from
:class:`~cryo_lightning.abinitio.moment_simulation.MomentSimulator`, two or more CTF groups),
and a start: white coefficients scaled so that ``tr M2`` matches the target's, with the
uniform viewing distribution (rotation invariant, so the start's law is too). Every random draw
of example ``i`` of a split is seeded by ``(seed, split, epoch, i)``: the same in every process.

The datamodule also owns the physics the task needs (the moment forward model for the loss,
the basis for O(3) alignment), so that :mod:`~cryo_lightning.tasks.reconstructor` holds none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cryo_lightning.abinitio.image_moments import ImageMoments, MomentLayout
from cryo_lightning.abinitio.moment_forward_model import MomentModel
from cryo_lightning.abinitio.moment_loss import moment_loss
from cryo_lightning.abinitio.moment_simulation import MomentSimulator
from cryo_lightning.abinitio.moment_solver import uniform_view_start
from cryo_lightning.abinitio.volume_alignment import align_volumes
from cryo_lightning.data.molecule_bank import SPLITS, MoleculeBank, derive_seed
from cryo_lightning.physics.ctf import CTFParams, ctf_2d
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.viewing_sh import SHViewingDistribution

__all__ = ["MomentDataModule"]


class _ExampleStream(IterableDataset):
    def __init__(self, make: Callable[[int, int], dict[str, Any]], n: int) -> None:
        super().__init__()
        self.make, self.n, self.epoch = make, n, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # With loader workers each takes every num_workers-th example; the workers persist, so
        # each one's copy of ``epoch`` advances with the epochs.
        info = get_worker_info()
        first, step = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(first, self.n, step):
            yield self.make(self.epoch, i)
        self.epoch += 1


def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


class MomentDataModule(pl.LightningDataModule):
    """Moment examples (module docstring) in batches of ``batch_size`` (lists of dicts).

    Args:
        box: ``L`` in pixels.
        l_max: SFB degree of the volume (and ``k_max`` of the image moments).
        bandlimit: volume and image band limit, cycles/pixel.
        view_degree: even degree ``2h`` of the viewing distributions.
        n_images: images per example; ``None`` gives exact moments.
        snr: SNR of the images (with ``n_images``).
        defocus_um: defocus of each CTF group in micrometres (300 kV, Cs 2.7 mm, 10 % amplitude
            contrast); empty for no CTF.
        pixel_size: Angstrom per pixel (for the CTF).
        third: include the third-moment slice.
        batch_size: examples per batch.
        n_train_molecules, n_val_molecules, n_test_molecules: molecules in the train, val and
            test banks (the test bank serves held-out benchmarks; no loader uses it).
        train_examples, val_examples: examples per epoch (train examples differ between epochs).
        seed: base seed of molecules and examples.
        num_workers: loader processes simulating examples in parallel (moments of ``n_images``
            noisy images cost about as much as the network step); each example is made once
            whatever the count, and is the same as with ``0``.

    Each example is a dict: ``coeffs (count,)``, ``view_coeffs (b_count,)``, ``moments``
    (:class:`ImageMoments`), ``start (count,)``, ``view_start (b_count,)``, all float64.
    """

    def __init__(self, box: int = 16, l_max: int = 2, bandlimit: float = 0.5, view_degree: int = 2,
                 n_images: int | None = None, snr: float = 0.1, defocus_um: list[float] | None = None,
                 pixel_size: float = 3.0, third: bool = True, batch_size: int = 4, n_train_molecules: int = 256,
                 n_val_molecules: int = 8, train_examples: int = 1024, val_examples: int = 8, seed: int = 0,
                 num_workers: int = 0, n_test_molecules: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.view_degree, self.n_images, self.snr, self.third = int(view_degree), n_images, float(snr), bool(third)
        self.batch_size, self.seed, self.num_workers = int(batch_size), int(seed), int(num_workers)
        self.basis = SphericalFourierBesselBasis(box, l_max=l_max, bandlimit=bandlimit)
        self.layout = MomentLayout(box, l_max, bandlimit=bandlimit)
        defocus = [1.0, 2.0] if defocus_um is None else list(defocus_um)
        ctfs = None
        if defocus:
            d = torch.tensor(defocus, dtype=torch.float64) * 1e4
            ctfs = ctf_2d(CTFParams(defocus_u=d, defocus_v=d, defocus_angle=0.0, voltage=300.0, cs=2.7,
                                    amplitude_contrast=0.1), box, pixel_size=pixel_size)
        self.ctfs = ctfs  # (G, L, L) centred CTFs of the groups, or None
        self.moment_model = MomentModel(self.basis, self.layout, self.view_degree, ctfs=ctfs, third=self.third)
        self.simulator = MomentSimulator(self.basis, self.layout, ctfs, chunk=min(10_000, n_images or 10_000))
        self.banks = {"train": MoleculeBank(box, "train", n_train_molecules, seed),
                      "val": MoleculeBank(box, "val", n_val_molecules, seed),
                      "test": MoleculeBank(box, "test", n_test_molecules, seed)}
        self.sizes = {"train": int(train_examples), "val": int(val_examples)}

    @property
    def volume_irreps(self) -> str:
        """e3nn irreps of the volume coefficients."""
        return self.basis.layout.irreps()

    def train_coefficients(self) -> torch.Tensor:
        """``(M, count)`` float64 SFB coefficients of the training molecules (fits the learned prior)."""
        bank = self.banks["train"]
        return torch.stack([self.basis.expand(bank[i].to(torch.float64)) for i in range(len(bank))])

    # ----------------------------------------------------------------------------- examples
    def example(self, split: str, epoch: int, index: int) -> dict[str, Any]:
        """Example ``index`` of ``split`` (train, val or test) in ``epoch`` (the loaders pass 0 for val)."""
        bank = self.banks[split]
        g = torch.Generator().manual_seed(derive_seed(self.seed, SPLITS.index(split), epoch, index))
        a = self.basis.expand(bank[index % len(bank)].to(torch.float64))
        dist = SHViewingDistribution.random(self.view_degree, generator=g)
        groups = self.moment_model.n_groups
        if self.n_images is None:
            with torch.no_grad():
                moments = self.moment_model.with_third(a, dist.coeffs) if self.third else (*self.moment_model(a, dist.coeffs), None)
            one = torch.ones(groups, dtype=torch.float64)
            target = ImageMoments(moments[0], moments[1], one, 0 * one, moments[2])
        else:
            std = self.simulator.noise_std(a, dist, self.snr, g)
            target = self.simulator.moments(a, dist, self.n_images, g, noise_std=std, third=self.third)[self.n_images]
        a0, b0 = uniform_view_start(self.moment_model, target, g)
        return {"coeffs": a, "view_coeffs": dist.coeffs, "moments": target, "start": a0, "view_start": b0}

    def loss_fn(self, target: ImageMoments) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The invariant moment loss against ``target`` (M3 slice included when ``third``)."""
        def loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return moment_loss(self.moment_model, a, b, target, use_m3=self.third)
        return loss

    def align_reference(self, estimate: torch.Tensor, reference: torch.Tensor, n_grid: int = 1000,
                        n_refine: int = 4) -> torch.Tensor:
        """``reference`` moved by the O(3) element that best matches it to ``estimate`` (no gradient);
        ``n_refine`` best grid points per handedness are refined (fewer is faster, more is surer)."""
        return align_volumes(self.basis, estimate.detach(), reference.detach(), n_grid=n_grid, n_refine=n_refine).aligned

    # ----------------------------------------------------------------------------- loaders
    def _loader(self, split: str) -> DataLoader:
        stream = _ExampleStream(lambda epoch, i: self.example(split, epoch if split == "train" else 0, i),
                                self.sizes[split])
        return DataLoader(stream, batch_size=self.batch_size, collate_fn=_as_list, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # the moment model lives on the CPU with the examples
