"""Training examples for the joint pipeline: a molecule's noisy images, their clean targets and moments.

Each example extends a :class:`~cryo_lightning.data.moment_examples.MomentDataModule` example
(a molecule of the bank as SFB coefficients, a random non-uniform viewing distribution, a start)
with ``n_images`` projections drawn from that distribution by
:class:`~cryo_lightning.abinitio.moment_simulation.MomentSimulator` (CTF group ``i mod G`` for
image ``i``), white noise at ``snr``, and everything scaled to unit noise variance (as in
RELION-normalised particles): images, clean targets, the volume coefficients and the moments.
``moments`` are the noise-debiased moments of the *noisy* images (what a classical method of
moments sees); the joint task forms the moments of the *denoised* images itself with
:meth:`JointDataModule.image_moments`, which is differentiable in the images.

Every random draw of example ``i`` of a split is seeded by ``(seed, split, epoch, i)``, as in the
parent module, so the examples are the same in every process and on every run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from cryo_lightning.abinitio.image_moments import ImageMoments, MomentEstimator
from cryo_lightning.abinitio.moment_solver import uniform_view_start
from cryo_lightning.data.molecule_bank import SPLITS, derive_seed
from cryo_lightning.data.moment_examples import MomentDataModule
from cryo_lightning.physics.noise import signal_power
from cryo_lightning.physics.viewing_sh import SHViewingDistribution

__all__ = ["JointDataModule"]


class JointDataModule(MomentDataModule):
    """Image examples for the joint denoiser + reconstructor (module docstring).

    Args:
        n_images: images per example (a multiple of ``set_size``).
        set_size: images per set given to the denoiser (``n_images / set_size`` sets per example).
        snr: SNR of the images (signal variance over noise variance, in the projections' box).
        Others: as :class:`MomentDataModule` (``box``, ``l_max``, ``bandlimit``, ``view_degree``,
            ``defocus_um``, ``pixel_size``, ``third``, ``batch_size``, molecule counts, example
            counts, ``seed``, ``num_workers``).

    Each example is a dict: ``noisy``, ``clean`` ``(n_images / set_size, set_size, L, L)``
    float32 (unit noise variance), ``ctf`` of the same shape, ``groups`` ``(n_images,)`` int64
    CTF group per image (row-major over the sets), ``coeffs (count,)`` float64 SFB coefficients
    of the volume in the same units, ``view_coeffs``, ``moments`` (:class:`ImageMoments` of the
    noisy images, debiased with the unit noise variance), ``start``, ``view_start``, ``snr``.
    """

    def __init__(self, box: int = 16, l_max: int = 2, bandlimit: float = 0.5, view_degree: int = 2,
                 n_images: int = 512, set_size: int = 32, snr: float = 0.1, defocus_um: list[float] | None = None,
                 pixel_size: float = 3.0, third: bool = True, batch_size: int = 2, n_train_molecules: int = 256,
                 n_val_molecules: int = 8, n_test_molecules: int = 8, train_examples: int = 1024,
                 val_examples: int = 8, seed: int = 0, num_workers: int = 0) -> None:
        if n_images % set_size:
            raise ValueError(f"n_images ({n_images}) must be a multiple of set_size ({set_size})")
        super().__init__(box=box, l_max=l_max, bandlimit=bandlimit, view_degree=view_degree, n_images=n_images,
                         snr=snr, defocus_um=defocus_um, pixel_size=pixel_size, third=third, batch_size=batch_size,
                         n_train_molecules=n_train_molecules, n_val_molecules=n_val_molecules,
                         train_examples=train_examples, val_examples=val_examples, seed=seed,
                         num_workers=num_workers, n_test_molecules=n_test_molecules)
        self.set_size = int(set_size)
        ones = torch.ones(1, box, box, dtype=torch.float64)
        self.group_ctfs = (self.ctfs if self.ctfs is not None else ones).to(torch.float32)  # (G, L, L)

    def example(self, split: str, epoch: int, index: int) -> dict[str, Any]:
        """Example ``index`` of ``split`` (train, val or test) in ``epoch`` (the loaders pass 0 for val)."""
        bank = self.banks[split]
        g = torch.Generator().manual_seed(derive_seed(self.seed, SPLITS.index(split), epoch, index))
        a = self.basis.expand(bank[index % len(bank)].to(torch.float64))
        dist = SHViewingDistribution.random(self.view_degree, generator=g)
        chunks = list(self.simulator.images(a, dist, self.n_images, g))
        clean, groups = torch.cat([c[0] for c in chunks]), torch.cat([c[2] for c in chunks])
        # noise scaled to the example's own signal power (box variance, DESIGN's SNR), then
        # everything divided by the noise std: unit noise variance
        std = math.sqrt(float(signal_power(clean, dim=(-3,))) / self.snr)
        noisy = (clean / std + torch.randn(clean.shape, generator=g, dtype=clean.dtype)).to(torch.float32)
        clean, a = (clean / std).to(torch.float32), a / std
        moments = self.image_moments(noisy.to(torch.float64), groups, noise_variance=1.0)  # of the images as given
        a0, b0 = uniform_view_start(self.moment_model, moments, g)
        sets = (-1, self.set_size, self.basis.L, self.basis.L)
        return {"noisy": noisy.reshape(sets), "clean": clean.reshape(sets),
                "ctf": self.group_ctfs[groups].reshape(sets), "groups": groups, "coeffs": a,
                "view_coeffs": dist.coeffs, "moments": moments, "start": a0, "view_start": b0, "snr": self.snr}

    def image_moments(self, images: torch.Tensor, groups: torch.Tensor, noise_variance: float = 0.0) -> ImageMoments:
        """Moments of ``(..., L, L)`` images (flattened in order, ``groups`` per image), debiased
        with ``noise_variance`` (0 for denoised images); differentiable in ``images``."""
        est = MomentEstimator(self.layout, self.moment_model.n_groups, third=self.third)
        est.update(images.reshape(-1, *images.shape[-2:]), groups, noise_variance)
        return est.result()

    @torch.no_grad()
    def train_targets(self, molecules: int, max_images: int = 1024,
                      device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Clean images and CTFs of the first training epoch's examples, molecule by molecule.

        The population prior of a set denoiser (``PolarSetTransformer.fit_population``) is fitted
        to these; they are images that training shows, so the prior adds no data. Each molecule's
        images are scaled to unit signal variance.

        Yields:
            per molecule, ``(n, L, L)`` float32 clean images and ``(n, L, L)`` CTFs.
        """
        if molecules > len(self.banks["train"]):
            raise ValueError(f"{molecules} prior molecules asked for, but the training bank has "
                             f"{len(self.banks['train'])}")
        n_bank = len(self.banks["train"])
        device = torch.device(device) if device is not None else torch.device("cpu")
        for m in range(molecules):
            clean, ctf, count = [], [], 0
            for index in range(m, self.sizes["train"], n_bank):  # the epoch-0 examples of molecule m
                ex = self.example("train", 0, index)
                c = ex["clean"].reshape(-1, *ex["clean"].shape[-2:])
                clean.append(c / c.square().mean().sqrt().clamp_min(1e-30))
                ctf.append(ex["ctf"].reshape(c.shape))
                count += c.shape[0]
                if count >= max_images:
                    break
            if not clean:
                raise ValueError(f"the first training epoch ({self.sizes['train']} examples) shows no example of "
                                 f"training molecule {m}; raise train_examples or lower the prior molecules")
            yield torch.cat(clean)[:max_images].to(device), torch.cat(ctf)[:max_images].to(device)
