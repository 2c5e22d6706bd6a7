"""End-of-fit report of a joint run: maps, FSC plot, image gallery and metrics in the run folder.

After training, :class:`JointReport` runs the whole pipeline on held-out molecules of the test
bank (never seen in training or validation), twice per molecule:

- ``denoised``: noisy images -> the trained denoiser -> moments -> the reconstructor;
- ``raw``: the noise-debiased moments of the same noisy images -> the same reconstructor
  (the classical input, for reference),

each then finished by the MAP polish of ``cryol reconstruct --method learned``
(:func:`~cryo_lightning.abinitio.moment_solver.map_polish` with the reconstructor's learned coefficient
prior) against the noise-debiased raw moments in both routes: denoised images' moments are
shrunk (a denoiser removes what it cannot resolve), so fitting them to convergence would fit
that bias, while the debiased moments are unbiased; the denoiser's part is the better start it
gives the reconstructor (compare the network-alone errors). Errors are O(3)-aligned
relative coefficient errors against the truth; FSCs are between the voxel maps of the estimate
and the aligned truth. Files (in ``out_dir``, default the trainer's ``default_root_dir``)::

    map.mrc          the first molecule's map from the denoised route (pixel size in the header)
    map_truth.mrc    its ground truth, rotated/mirrored onto the map (open both in ChimeraX)
    map_raw.mrc      the first molecule's map from the raw route
    fsc.png          FSC of both routes against the truth, first molecule
    gallery.png      noisy | denoised | clean images of the first molecule
    metrics.json     per-molecule and median numbers, and the last validation metrics
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from tqdm import tqdm

from cryo_lightning.abinitio.moment_solver import map_polish
from cryo_lightning.abinitio.volume_alignment import aligned_fsc
from cryo_lightning.io.atomic_write import atomic_path
from cryo_lightning.io.json_text import json_text
from cryo_lightning.io.mrc import write_map
from cryo_lightning.physics.fourier import resolution_at
from cryo_lightning.plots import fsc_plot, save_grid_png
from cryo_lightning.tasks.image_grid import image_grid

__all__ = ["JointReport", "evaluate_pipeline"]


class JointReport(pl.Callback):
    """Write the report of the module docstring when ``fit`` ends (global rank 0; not in ``fast_dev_run``).

    Args:
        out_dir: folder of the outputs (default: the trainer's ``default_root_dir``).
        molecules: held-out test molecules to evaluate.
        polish: L-BFGS iterations of the MAP polish (0: the network's output as is).
        prior_strength: weight of the learned prior in the polish (units of the sampling error).
        gallery_images: images per row of the gallery.
    """

    def __init__(self, out_dir: str | None = None, molecules: int = 4, polish: int = 200,
                 prior_strength: float = 0.1, gallery_images: int = 8) -> None:
        self.out_dir, self.molecules, self.polish = out_dir, int(molecules), int(polish)
        self.prior_strength, self.gallery_images = float(prior_strength), int(gallery_images)

    def on_fit_end(self, trainer: pl.Trainer, task: pl.LightningModule) -> None:
        if trainer.global_rank != 0 or trainer.fast_dev_run:  # a smoke run writes no outputs (like its loggers)
            return
        out = Path(self.out_dir or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = evaluate_pipeline(task, trainer.datamodule, self.molecules, self.polish, self.prior_strength,
                                   out=out, gallery_images=self.gallery_images)
        report["validation"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        with atomic_path(out / "metrics.json", overwrite=True) as tmp:
            tmp.write_text(json_text(report, indent=2))
        m = report["median"]
        print(f"\nJoint pipeline on {self.molecules} held-out molecules (medians):\n"
              f"  image relative MSE   noisy {m['noisy_rel_mse']:.3f}   denoised {m['image_rel_mse']:.3f}\n"
              f"  volume error         denoised route {m['volume_err_denoised']:.3f}   "
              f"raw moments {m['volume_err_raw']:.3f}   (network alone: {m['network_err_denoised']:.3f}, "
              f"{m['network_err_raw']:.3f})\n"
              f"Run folder {out}: map.mrc, map_truth.mrc, map_raw.mrc, fsc.png, gallery.png, metrics.json")


@torch.no_grad()
def evaluate_pipeline(task: pl.LightningModule, dm, molecules: int, polish: int = 200, prior_strength: float = 0.1,
                      split: str = "test", out: Path | None = None, gallery_images: int = 8) -> dict[str, Any]:
    """Both routes of the module docstring on the first ``molecules`` examples of ``split``.

    Args:
        task: a :class:`~cryo_lightning.tasks.joint.JointTask` whose ``physics`` is ``dm``.
        dm: the :class:`~cryo_lightning.data.joint_examples.JointDataModule` of its training.
        molecules, polish, prior_strength: as :class:`JointReport`.
        split: ``"test"`` (held out from training and validation) or ``"val"``.
        out: if given, the first molecule's maps, FSC plot and gallery are written there.
        gallery_images: images per gallery row.
    Returns:
        ``{"molecules": [per-molecule numbers], "median": {...}, "settings": {...}}``.
    """
    was_training = task.training
    task.eval()
    pixel, L = float(dm.hparams.pixel_size), dm.basis.L
    rows = []
    for i in tqdm(range(molecules), desc=f"joint pipeline on {split} molecules", unit="molecule"):
        ex = dm.example(split, 0, i)
        denoised = task.denoise([ex]).cpu()
        row = {"molecule": i, "noisy_rel_mse": _rel(ex["noisy"], ex["clean"]), "image_rel_mse": _rel(denoised, ex["clean"])}
        routes = {"denoised": dm.image_moments(denoised.to(torch.float64), ex["groups"]), "raw": ex["moments"]}
        maps, curves = {}, {}
        for route, moments in routes.items():
            a, b = task.reconstruct(moments, ex["start"], ex["view_start"])
            row[f"network_err_{route}"] = _aligned_error(dm, a, ex["coeffs"])[0]
            with torch.enable_grad():  # both polish against the unbiased moments (docstring)
                a, _, _ = map_polish(dm.moment_model, ex["moments"], a.detach(), b.detach(),
                                     task.reconstructor.prior.energy, polish, prior_strength, dm.third)
            err, truth = _aligned_error(dm, a, ex["coeffs"])
            fsc = aligned_fsc(dm.basis, truth, a)
            row[f"volume_err_{route}"] = err
            row[f"fsc05_A_{route}"] = resolution_at(fsc, 0.5, L, pixel)
            maps[route], maps["truth"], curves[route] = a, truth, fsc.tolist()
        rows.append(row)
        if i == 0 and out is not None:
            _write_files(out, dm, ex, denoised, maps, curves, pixel, gallery_images)
    task.train(was_training)
    keys = [k for k in rows[0] if k != "molecule"]
    return {"molecules": rows, "median": {k: statistics.median(r[k] for r in rows) for k in keys},
            "settings": {"split": split, "polish": polish, "prior_strength": prior_strength, "box": L,
                         "pixel_size_A": pixel, "n_images": dm.n_images, "snr": dm.snr}}


def _write_files(out: Path, dm, ex: dict[str, Any], denoised: torch.Tensor, maps: dict[str, torch.Tensor],
                 curves: dict[str, list[float]], pixel: float, gallery_images: int) -> None:
    names = {"denoised": "map.mrc", "truth": "map_truth.mrc", "raw": "map_raw.mrc"}
    for route, name in names.items():
        write_map(out / name, dm.basis.evaluate(maps[route]).to(torch.float32), pixel, overwrite=True)
    fsc_plot(out / "fsc.png", {"denoised -> learned MoM": curves["denoised"],
                               "raw moments -> learned MoM": curves["raw"]}, dm.basis.L, pixel)
    grid = image_grid([ex["noisy"], denoised, ex["clean"]], gallery_images)
    save_grid_png(out / "gallery.png", grid, ["noisy", "denoised", "clean"])


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).square().sum() / ref.square().sum())


def _aligned_error(dm, a: torch.Tensor, coeffs: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Relative error after moving the truth onto ``a`` by the best O(3) element, and that truth."""
    truth = dm.align_reference(a, coeffs)
    return float((a - truth).norm() / coeffs.norm()), truth
