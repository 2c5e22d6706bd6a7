"""The one loader of denoising models (shipped names or ``cryol fit`` checkpoints), and their weights-only export.

:func:`load_denoiser` is what ``cryol denoise``, ``cryol reconstruct --denoiser`` and
``cryol evaluate --denoiser`` use: it returns the task in evaluation mode and a
:class:`~cryo_lightning.tasks.model_registry.ModelCard`, taken from the registry of shipped models
(:mod:`cryo_lightning.tasks.model_registry`) or, for a user checkpoint, built from what the
checkpoint records (:mod:`cryo_lightning.tasks.training_record`), with ranges None when it records
nothing. :func:`export_weights` writes the weights-only files that the registry ships.
:mod:`cryo_lightning.tasks.model_inputs` turns a card into the resampling of a stack and the
warnings about it.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from cryo_lightning.io.atomic_write import atomic_path
from cryo_lightning.io.errors import InputError
from cryo_lightning.tasks.checkpoints import read_checkpoint, task_name
from cryo_lightning.tasks.denoise import DenoiseTask
from cryo_lightning.tasks.model_registry import PREFIX, ModelCard, find_model, list_models, manifest_path
from cryo_lightning.tasks.training_record import training_data

__all__ = ["load_pretrained", "load_denoiser", "set_inference_option", "load_denoise_task",
           "export_weights"]

# context set size of a guided model's checkpoint (its classical guide is fitted to the set)
GUIDED_SET_SIZE = 1024


def load_pretrained(name: str | None = None, device: str | torch.device = "cpu",
                    manifest: str | os.PathLike | None = None) -> tuple[DenoiseTask, ModelCard]:
    """The shipped model ``name`` (None: the default), in evaluation mode on ``device``, and its card."""
    card = find_model(name, manifest)
    if card.file is None or not card.file.is_file():
        raise InputError(f"model {card.name!r}: its weights {card.file} are missing from the installation "
                         f"({manifest_path(manifest)})")
    task = load_denoise_task(card.file, torch.device(device))
    for key, value in card.inference.items():
        set_inference_option(task, key, value, f"model {card.name!r} ({manifest_path(manifest)})")
    return task, card


def set_inference_option(task: DenoiseTask, key: str, value: Any, where: str) -> None:
    """Set the network's inference setting ``key`` (an attribute it already has, of the same type).

    Raises:
        InputError: the network has no such setting, or ``value`` is of another type.
    """
    net = task.net
    if key.startswith("_") or not hasattr(net, key) or isinstance(getattr(net, key), (torch.nn.Module, torch.Tensor)):
        raise InputError(f"{where}: {type(net).__name__} has no inference setting {key!r}")
    current = getattr(net, key)
    if current is not None and type(current) is not type(value):
        raise InputError(f"{where}: {key} must be {type(current).__name__}, got {value!r}")
    setattr(net, key, value)


def load_denoiser(spec: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  manifest: str | os.PathLike | None = None, option: str = "--ckpt") -> tuple[DenoiseTask, ModelCard]:
    """A denoiser from a shipped model name (``name`` or ``pretrained:name``; None: the default
    model) or a checkpoint path, in evaluation mode on ``device``, with its
    :class:`~cryo_lightning.tasks.model_registry.ModelCard`.

    A checkpoint's card takes its box, pixel size, SNR range and set size from what the
    checkpoint records (see :func:`~cryo_lightning.tasks.training_record.training_data`); what it
    does not record is None.

    Raises:
        InputError: neither an existing file nor a shipped name (the message lists the names).
    """
    if spec is None or str(spec).startswith(PREFIX):
        return load_pretrained(None if spec is None else str(spec), device, manifest)
    path = Path(spec)
    if path.exists() or path.is_symlink():  # a file, or a folder etc. that read_checkpoint explains
        task = load_denoise_task(path, torch.device(device), option)
        return task, _checkpoint_card(path, task)
    names = [c.name for c in list_models(manifest)]
    if str(spec) in names:
        return load_pretrained(str(spec), device, manifest)
    available = ", ".join(names) if names else "none is shipped yet"
    raise InputError(f"{spec}: no such checkpoint file, and not a shipped model (shipped models: {available})")


# -- checkpoints ----------------------------------------------------------------------------------


def _read_checkpoint(path: Path, what: str = "--ckpt") -> dict:
    """:func:`~cryo_lightning.tasks.checkpoints.read_checkpoint`, memory-mapped."""
    return read_checkpoint(path, what)


# checkpoints that hold a denoiser ("" : written before tasks recorded their class)
DENOISER_TASKS = ("", "DenoiseTask", "SelfSupervisedDenoiseTask", "JointTask")


def load_denoise_task(ckpt: str | os.PathLike, device: torch.device, option: str = "--ckpt") -> DenoiseTask:
    """The denoising task of a ``cryol fit`` checkpoint (or an :func:`export_weights` file), in
    evaluation mode on ``device``: a ``DenoiseTask``, the ``SelfSupervisedDenoiseTask`` (whose
    inference differs) that the checkpoint's ``_class_path`` names, or the denoiser of a
    ``JointTask`` (the main job) in a ``DenoiseTask``."""
    from cryo_lightning.tasks.joint import JointTask
    from cryo_lightning.tasks.self_supervised import SelfSupervisedDenoiseTask

    path = Path(ckpt)
    name = task_name(_read_checkpoint(path, option))
    if name not in DENOISER_TASKS:
        raise InputError(f"{option} {path} is a {name or 'unnamed task'} checkpoint, not a denoiser: give one "
                         f"written by {', '.join(DENOISER_TASKS[1:])} (or a shipped model name)")
    class_path = "." + name
    if class_path.endswith(".SelfSupervisedDenoiseTask"):
        # Its starting checkpoint was used in training; the weights here supersede it.
        task = SelfSupervisedDenoiseTask.load_from_checkpoint(path, map_location=device, init_ckpt=None)
    elif class_path.endswith(".JointTask"):
        # its pretrained-checkpoint options were used in training; the weights here supersede them
        joint = JointTask.load_from_checkpoint(path, map_location=device, denoiser_ckpt=None, reconstructor_ckpt=None)
        task = DenoiseTask(joint.denoiser).to(device)
    else:
        task = DenoiseTask.load_from_checkpoint(path, map_location=device)
    bad = sum(int((~torch.isfinite(t)).sum()) for t in task.state_dict().values() if t.is_floating_point())
    if bad:
        raise InputError(f"{option} {path}: {bad} weight(s) are NaN or Inf (the training diverged); use a "
                         "checkpoint from before it did")
    return task.eval()


def _is_set_model(net: torch.nn.Module) -> bool:
    """Set models take the set's CTFs (the polar set transformer); single-image networks do not."""
    return "ctf" in inspect.signature(net.forward).parameters or getattr(net, "L", None) is not None


def _checkpoint_card(path: Path, task: DenoiseTask) -> ModelCard:
    checkpoint = _read_checkpoint(path)
    data = training_data(checkpoint)
    hparams = checkpoint.get("hyper_parameters", {})
    kind = "set" if _is_set_model(task.net) else "single-image"
    pixel = data.get("pixel_size_range") or ([data["pixel_size"]] * 2 if "pixel_size" in data else None)
    snr = data.get("snr_range")
    set_size = data.get("set_size") if kind == "set" else 1
    if getattr(task.net, "guide", None) is not None:
        # a guide fitted to its set (Wiener, CWF) improves with the set's size whatever sets it was
        # trained or fine-tuned on (the demo fine-tuning trains on sets of 48)
        set_size = max(int(set_size or 0), GUIDED_SET_SIZE)
    net = hparams.get("net", hparams.get("denoiser"))
    net_name = net.get("class_path", "").rsplit(".", 1)[-1] if isinstance(net, dict) else type(task.net).__name__
    return ModelCard(
        name=str(path), kind=kind, file=path.resolve(),
        description=f"{net_name} from {str(hparams.get('_class_path', 'DenoiseTask')).rsplit('.', 1)[-1]} checkpoint",
        box=data.get("box") or getattr(task.net, "L", None),
        pixel_size_range=None if pixel is None else (float(pixel[0]), float(pixel[1])),
        snr_range=None if snr is None else (float(snr[0]), float(snr[1])),
        set_size=int(set_size or (64 if kind == "set" else 1)))


def export_weights(ckpt_path: str | os.PathLike, out_path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a weights-only copy of a ``cryol fit`` denoiser checkpoint, for shipping.

    Kept: ``state_dict``, ``hyper_parameters`` (what ``load_from_checkpoint`` rebuilds the task
    from), ``pytorch-lightning_version`` and ``training_data``
    (:func:`~cryo_lightning.tasks.training_record.training_data`); dropped: optimizer states,
    schedulers, loops, callbacks and the datamodule's state. A ``JointTask`` checkpoint becomes a
    ``DenoiseTask`` one holding its denoiser; a ``SelfSupervisedDenoiseTask`` stays one (its
    inference differs); ``init_ckpt`` is cleared.

    Args:
        ckpt_path: a ``DenoiseTask``, ``SelfSupervisedDenoiseTask`` or ``JointTask`` checkpoint.
        out_path: the file to write (``.pt``), atomically.
        overwrite: replace an existing ``out_path``.
    Returns:
        ``out_path``.
    """
    ckpt_path, out_path = Path(ckpt_path), Path(out_path)
    checkpoint = _read_checkpoint(ckpt_path, "checkpoint")
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    state = checkpoint.get("state_dict", {})
    class_path = str(hparams.get("_class_path", ""))
    if class_path.endswith(".JointTask"):
        state = {"net." + k[len("denoiser."):]: v for k, v in state.items() if k.startswith("denoiser.")}
        hparams = {"_class_path": f"{DenoiseTask.__module__}.DenoiseTask", "net": hparams["denoiser"],
                   "lr": hparams.get("lr", 1e-3), "lr_overrides": None,
                   **({"_instantiator": hparams["_instantiator"]} if "_instantiator" in hparams else {})}
    elif "init_ckpt" in hparams:  # the starting weights were used in training; these supersede them
        hparams["init_ckpt"] = None
    if not any(k.startswith("net.") for k in state):
        raise InputError(f"checkpoint {ckpt_path}: no denoiser weights (net.* or denoiser.*); give a DenoiseTask, "
                         "SelfSupervisedDenoiseTask or JointTask checkpoint written by `cryol fit`")
    exported = {"state_dict": {k: v.clone() for k, v in state.items()}, "hyper_parameters": hparams,
                "pytorch-lightning_version": checkpoint.get("pytorch-lightning_version", pl.__version__),
                "training_data": training_data(checkpoint)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path, overwrite=overwrite) as tmp:
        torch.save(exported, tmp)
    return out_path
