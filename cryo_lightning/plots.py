"""Figures written next to results (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryo_lightning.io.atomic_write import atomic_path

__all__ = ["fsc_plot", "moment_consistency_plot", "save_grid_png"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fsc_plot(path: Path, curves: dict[str, list[float]], L: int, pixel: float, ylabel: str = "FSC") -> None:
    """FSC/FRC curves against spatial frequency (1/Angstrom), with the 0.5 and 0.143 thresholds.

    Args:
        path: output PNG (replaced).
        curves: label -> correlation per one-pixel shell (shell ``n`` at ``n / (L pixel)``).
        L: box size in pixels.
        pixel: pixel size in Angstrom.
        ylabel: axis label (``"FSC"`` or ``"FRC"``).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, fsc in curves.items():
        shells = np.arange(len(fsc))
        ax.plot(shells[1:] / (L * pixel), np.asarray(fsc)[1:], label=label)
    ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
    ax.axhline(0.143, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("spatial frequency (1/Angstrom)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.1, 1.05)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def save_grid_png(path: Path, grid: torch.Tensor, row_labels: list[str], scale: float = 3.0) -> None:
    """A ``(R L, k L)`` grid in ``[0, 1]`` (:func:`~cryo_lightning.tasks.image_grid.image_grid`) as a
    grey-scale PNG with one label per row."""
    plt = _pyplot()
    height, width = grid.shape
    rows = len(row_labels)
    fig, ax = plt.subplots(figsize=(scale * width / height * rows / 1.0 * 0.5 + 1.0, scale * rows * 0.5))
    ax.imshow(grid.cpu().numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(r + 0.5) * height / rows for r in range(rows)], row_labels)
    fig.tight_layout()
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def moment_consistency_plot(path: Path, consistency) -> None:
    """The moment consistency of denoised images (a
    :class:`~cryo_lightning.abinitio.evaluation.MomentConsistency`): relative differences of M1 and
    of each M2 block against the raw estimate's sampling error, and the M2 energy ratios."""
    plt = _pyplot()
    mc = consistency
    k = np.arange(len(mc.m2_difference))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    ax1.semilogy(k, mc.m2_difference, "o-", color="C0", label="denoised vs raw (debiased)")
    ax1.semilogy(k, mc.m2_error, "k--", lw=1.0, label="sampling error of raw")
    ax1.semilogy([-1], [mc.m1_difference], "o", color="C0")
    ax1.semilogy([-1], [mc.m1_error], "_", color="k", ms=12)
    ax1.set_xticks([-1, *k.tolist()], ["M1", *(str(i) for i in k)])
    ax1.set_xlabel("M1, and M2 block k")
    ax1.set_ylabel("relative Frobenius difference")
    ax1.legend(fontsize=8)
    ax2.plot(k, mc.m2_energy_ratio, "o-")
    ax2.axhline(1.0, color="0.6", lw=0.8)
    ax2.set_xlim(-0.5, len(k) - 0.5)
    ax2.set_xlabel("M2 block k (blocks the raw data do not resolve are left out)", fontsize=8)
    ax2.set_ylabel("tr M2_k(denoised) / tr M2_k(raw)")
    ax2.set_title("< 1: shrinks, > 1: adds variance", fontsize=9)
    fig.tight_layout()
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
