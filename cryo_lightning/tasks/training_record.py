"""The record of a denoiser's training data in its checkpoints: box, pixel size, SNR range and set size.

:class:`RecordTrainingData`, which ``cryol fit`` adds to every run, writes
:func:`describe_datamodule` of the trainer's datamodule into every checkpoint; :func:`training_data`
reads it back (or, for older checkpoints, what the datamodule's saved hyperparameters say), so that
:func:`~cryo_lightning.tasks.pretrained.load_denoiser` can tell what a model was trained on.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

__all__ = ["training_data", "describe_datamodule", "RecordTrainingData"]


def _as_dict(value: Any) -> dict:
    if isinstance(value, dict):
        return value.get("init_args", value) if "class_path" in value else value
    return dict(vars(value)) if hasattr(value, "__dict__") else {}


def _pair(value: Any) -> list[float] | None:
    """``[lo, hi]`` of a scalar or a pair (SNR, pixel size), or None."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [float(value), float(value)]
    lo, hi = value
    return [float(lo), float(hi)]


def training_data(checkpoint: dict) -> dict[str, Any]:
    """What a checkpoint records about its training data: ``box`` (pixels), ``pixel_size``
    (Angstrom) or ``pixel_size_range`` ``[lo, hi]`` (each molecule at its own pixel size),
    ``snr_range`` ``[lo, hi]`` and ``set_size``; keys it does not record are absent.

    Read from the ``training_data`` entry (:class:`RecordTrainingData`,
    :func:`~cryo_lightning.tasks.pretrained.export_weights`), and for what it lacks from the
    datamodule's saved hyperparameters (``box``, ``pixel_size``, ``snr``, ``set_size``, or those
    of a ``simulation`` block).
    """
    recorded = checkpoint.get("training_data")
    recorded = {k: v for k, v in recorded.items() if v is not None} if isinstance(recorded, dict) else {}
    hp = checkpoint.get("datamodule_hyper_parameters") or {}
    sim = _as_dict(hp.get("simulation")) if hp.get("simulation") is not None else {}
    out = {"box": hp.get("box"), "pixel_size": hp.get("pixel_size", sim.get("pixel_size")),
           "pixel_size_range": _pair(hp.get("pixel_size_range")),
           "snr_range": _pair(hp.get("snr", sim.get("snr"))), "set_size": hp.get("set_size", sim.get("set_size"))}
    if out["pixel_size_range"] is not None:
        out["pixel_size"] = None
    if isinstance(out["set_size"], (list, tuple)):
        out["set_size"] = max(out["set_size"])
    return {**{k: v for k, v in out.items() if v is not None}, **recorded}


def describe_datamodule(datamodule: Any) -> dict[str, Any]:
    """Box (pixels), pixel size (Angstrom), SNR range and set size of a datamodule's training
    images, as far as it knows them (synthetic and joint datamodules know all four; a
    ``ParticleDataModule`` after setup knows its box, pixel size and set size)."""
    if datamodule is None:
        return {}
    box, pixel = getattr(datamodule, "box", None), getattr(datamodule, "pixel_size", None)
    preprocessor, source = getattr(datamodule, "preprocessor", None), getattr(datamodule, "source", None)
    if preprocessor is not None and source is not None:  # ParticleDataModule: at the processed box
        box = preprocessor.out_box
        pixel = float(source.table.particles["pixel_size_A"].median()) * source.box / box
    pixel_range = _pair(getattr(datamodule, "pixel_size_range", None))  # per-molecule pixel sizes
    simulation = getattr(datamodule, "simulation", None)
    snr = getattr(simulation, "snr", None) if simulation is not None else getattr(datamodule, "snr", None)
    set_size = getattr(datamodule, "set_size", None)
    if isinstance(set_size, (list, tuple)):
        set_size = max(set_size)
    out = {"box": None if box is None else int(box),
           "pixel_size": None if pixel is None or pixel_range is not None else float(pixel),
           "pixel_size_range": pixel_range, "snr_range": _pair(snr),
           "set_size": None if set_size is None else int(set_size)}
    return {k: v for k, v in out.items() if v is not None}


class RecordTrainingData(pl.Callback):
    """Writes :func:`describe_datamodule` of the trainer's datamodule into every checkpoint
    (key ``training_data``), so that :func:`~cryo_lightning.tasks.pretrained.load_denoiser` knows
    the box, pixel size and SNR a model was trained at. ``cryol fit`` adds it to every run."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        info = describe_datamodule(getattr(trainer, "datamodule", None))
        if info:
            checkpoint["training_data"] = info
