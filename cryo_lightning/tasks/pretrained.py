"""Shipped denoisers and the one loader of denoising models (shipped names or ``cryol fit`` checkpoints).

The registry is ``cryo_lightning/pretrained/models.json`` (installed with the package; the
environment variable ``CRYOL_MODELS`` or a ``manifest`` argument points at another one)::

    {"default": "<name>" | null,
     "models": [{"name", "file", "kind", "description", "config", "train_command", "wall_time",
                 "box", "pixel_size_range", "snr_range", "set_size", "max_box", "inference", "held_out"}, ...]}

``file`` is a weights-only checkpoint (:func:`export_weights`) relative to the manifest's folder;
``kind`` is ``"single-image"`` or ``"set"``; ``box`` the training box (pixels);
``pixel_size_range`` ``[lo, hi]`` Angstrom per pixel and ``snr_range`` ``[lo, hi]`` (the SNR of
docs/conventions.md §7) of the training data; ``set_size`` the context images per set the model
wants at inference (1 for single-image networks); ``inference`` settings of the network applied
when it is loaded (its attributes, e.g. ``{"sure_blend": true}`` for a
:class:`~cryo_lightning.models.guided_unet.GuidedUNet`); ``held_out`` free-form numbers measured
on held-out data.

:func:`load_denoiser` is what ``cryol denoise``, ``cryol reconstruct --denoiser`` and
``cryol evaluate --denoiser`` use: it returns the task in evaluation mode and a
:class:`ModelCard`, whose ranges for a user checkpoint come from what the checkpoint records
(:class:`RecordTrainingData`, which ``cryol fit`` adds to every run, or the datamodule's saved
hyperparameters) and are None when it records nothing. :func:`scale_plan` and
:func:`range_warnings` turn a card into the resampling of a stack and the warnings about it.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from cryo_lightning.data.resample import ScalePlan, in_range, plan_scale
from cryo_lightning.io.atomic_write import atomic_path
from cryo_lightning.io.errors import InputError
from cryo_lightning.tasks.checkpoints import read_checkpoint, task_name
from cryo_lightning.tasks.denoise import DenoiseTask

__all__ = ["KINDS", "MANIFEST", "MANIFEST_ENV", "ModelCard", "manifest_path", "list_models", "default_model_name",
           "find_model", "load_pretrained", "load_denoiser", "set_inference_option", "load_denoise_task", "resolve_checkpoint",
           "export_weights", "training_data", "describe_datamodule", "RecordTrainingData", "scale_plan",
           "range_warnings", "default_set_size"]

KINDS = ("single-image", "set")
MANIFEST = Path(__file__).resolve().parents[1] / "pretrained" / "models.json"
MANIFEST_ENV = "CRYOL_MODELS"
PREFIX = "pretrained:"
# images per forward-pass group for single-image networks, whose output does not depend on the set
SINGLE_IMAGE_GROUP = 64
# context set size of a guided model's checkpoint (its classical guide is fitted to the set)
GUIDED_SET_SIZE = 1024


@dataclass
class ModelCard:
    """What is known about a denoiser: where it came from and the data it was trained on.

    Attributes:
        name: the shipped name, or the checkpoint's path for a user checkpoint.
        kind: ``"single-image"`` or ``"set"``.
        description: one line.
        file: the weights file (absolute), or None.
        config: the ``configs/*.yaml`` that trained it (the last of the command's ``--config``
            files, after its base in ``configs/base/`` if it has one).
        train_command: the command that trained it (every stage's ``cryol fit``, with all its
            ``--config`` files).
        wall_time: how long that took, and where (free text).
        box: training box (pixels), or None when unknown.
        pixel_size_range: ``(lo, hi)`` Angstrom per pixel of the training images, or None.
        snr_range: ``(lo, hi)`` SNR of the training images, or None.
        set_size: context images per set wanted at inference (1: single-image network).
        max_box: the largest box the model should see (a larger input is resampled to coarser
            pixels, within the pixel-size range), or None.
        inference: network settings applied at load time (attribute name -> value).
        held_out: numbers measured on held-out data (free-form).
        default: True for the registry's default model.
    """

    name: str
    kind: str
    description: str = ""
    file: Path | None = None
    config: str | None = None
    train_command: str | None = None
    wall_time: str | None = None
    box: int | None = None
    pixel_size_range: tuple[float, float] | None = None
    snr_range: tuple[float, float] | None = None
    set_size: int = 1
    max_box: int | None = None
    inference: dict[str, Any] = field(default_factory=dict)
    held_out: dict[str, Any] = field(default_factory=dict)
    default: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (paths as strings, ranges as lists)."""
        out = asdict(self)
        out["file"] = None if self.file is None else str(self.file)
        for key in ("pixel_size_range", "snr_range"):
            out[key] = None if out[key] is None else list(out[key])
        return out


# -- the registry ---------------------------------------------------------------------------------


def manifest_path(manifest: str | os.PathLike | None = None) -> Path:
    """The registry in use: ``manifest``, else ``$CRYOL_MODELS``, else the shipped models.json."""
    if manifest is not None:
        return Path(manifest)
    return Path(os.environ[MANIFEST_ENV]) if os.environ.get(MANIFEST_ENV) else MANIFEST


def _range(entry: dict, key: str, where: str) -> tuple[float, float] | None:
    value = entry.get(key)
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 2) or not 0 < float(value[0]) <= float(value[1]):
        raise InputError(f"{where}: {key} must be [lo, hi] with 0 < lo <= hi, got {value!r}")
    return float(value[0]), float(value[1])


def _read_manifest(manifest: str | os.PathLike | None) -> tuple[Path, dict]:
    path = manifest_path(manifest)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"model registry {path}: no such file") from None
    except json.JSONDecodeError as err:
        raise InputError(f"model registry {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise InputError(f'model registry {path}: expected {{"default": ..., "models": [...]}}')
    return path, data


def list_models(manifest: str | os.PathLike | None = None) -> list[ModelCard]:
    """The models the registry lists, in its order (see the module docstring for the fields).

    Raises:
        InputError: the registry is unreadable, an entry lacks ``name``, ``file`` or ``kind``,
            has an unknown kind or a bad range, two entries share a name, or ``default`` names
            no entry.
    """
    path, data = _read_manifest(manifest)
    cards, default = [], data.get("default")
    for i, entry in enumerate(data["models"]):
        where = f"model registry {path}, entry {i + 1}"
        missing = [k for k in ("name", "file", "kind") if not entry.get(k)]
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)}")
        if entry["kind"] not in KINDS:
            raise InputError(f"{where}: kind must be one of {', '.join(KINDS)}, got {entry['kind']!r}")
        cards.append(ModelCard(
            name=str(entry["name"]), kind=entry["kind"], description=str(entry.get("description", "")),
            file=(path.parent / entry["file"]).resolve(), config=entry.get("config"),
            train_command=entry.get("train_command"), wall_time=entry.get("wall_time"),
            box=None if entry.get("box") is None else int(entry["box"]),
            pixel_size_range=_range(entry, "pixel_size_range", where), snr_range=_range(entry, "snr_range", where),
            set_size=int(entry.get("set_size") or 1), held_out=dict(entry.get("held_out") or {}),
            max_box=None if entry.get("max_box") is None else int(entry["max_box"]),
            inference=dict(entry.get("inference") or {}), default=entry["name"] == default))
    names = [c.name for c in cards]
    if len(set(names)) != len(names):
        raise InputError(f"model registry {path}: duplicate names in {names}")
    if default is not None and default not in names:
        raise InputError(f"model registry {path}: default {default!r} is not one of the listed models {names}")
    return cards


def default_model_name(manifest: str | os.PathLike | None = None) -> str | None:
    """The registry's default model, or None when it names none."""
    return _read_manifest(manifest)[1].get("default")


def find_model(name: str | None = None, manifest: str | os.PathLike | None = None) -> ModelCard:
    """The card of shipped model ``name`` (None: the default one).

    Raises:
        InputError: no such name (the message lists the available ones), or no default.
    """
    cards = list_models(manifest)
    names = [c.name for c in cards]
    if name is None:
        name = next((c.name for c in cards if c.default), None)
        if name is None:
            shipped = f"shipped models: {', '.join(names)}" if names else "none is shipped yet"
            raise InputError(f"no default denoiser in {manifest_path(manifest)} ({shipped}); pass --model NAME "
                             "or --ckpt CHECKPOINT (a `cryol fit` checkpoint)")
    if name.startswith(PREFIX):
        name = name[len(PREFIX):]
    for card in cards:
        if card.name == name:
            return card
    available = ", ".join(names) if names else "none (no model is shipped yet)"
    raise InputError(f"unknown model {name!r}; available: {available} (`cryol models` describes them)")


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
    model) or a checkpoint path, in evaluation mode on ``device``, with its :class:`ModelCard`.

    A checkpoint's card takes its box, pixel size, SNR range and set size from what the
    checkpoint records (see :func:`training_data`); what it does not record is None.

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


def resolve_checkpoint(spec: str | os.PathLike, manifest: str | os.PathLike | None = None) -> Path:
    """The file behind a checkpoint option: a shipped model's weights for ``pretrained:name`` or a
    shipped ``name`` that is not an existing file, else ``spec`` itself (checked by the caller)."""
    text = str(spec)
    if text.startswith(PREFIX):
        return find_model(text, manifest).file
    if not Path(text).exists():
        try:
            cards = list_models(manifest)
        except InputError:
            cards = []
        for card in cards:
            if card.name == text:
                return card.file
    return Path(text)


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

    Read from the ``training_data`` entry (:class:`RecordTrainingData`, :func:`export_weights`),
    and for what it lacks from the datamodule's saved hyperparameters (``box``, ``pixel_size``,
    ``snr``, ``set_size``, or those of a ``simulation`` block).
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
    (key ``training_data``), so that :func:`load_denoiser` knows the box, pixel size and SNR a
    model was trained at. ``cryol fit`` adds it to every run."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        info = describe_datamodule(getattr(trainer, "datamodule", None))
        if info:
            checkpoint["training_data"] = info


def export_weights(ckpt_path: str | os.PathLike, out_path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a weights-only copy of a ``cryol fit`` denoiser checkpoint, for shipping.

    Kept: ``state_dict``, ``hyper_parameters`` (what ``load_from_checkpoint`` rebuilds the task
    from), ``pytorch-lightning_version`` and ``training_data`` (:func:`training_data`); dropped:
    optimizer states, schedulers, loops, callbacks and the datamodule's state. A ``JointTask``
    checkpoint becomes a ``DenoiseTask`` one holding its denoiser; a ``SelfSupervisedDenoiseTask``
    stays one (its inference differs); ``init_ckpt`` is cleared.

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


# -- applying a card to a stack -----------------------------------------------------------------


def default_set_size(card: ModelCard) -> int:
    """Images per set when ``--set-size`` is not given: the card's for a set model; for a
    single-image network (whose output does not depend on the set) a batching group of 64."""
    return card.set_size if card.kind == "set" else max(card.set_size, SINGLE_IMAGE_GROUP)


def scale_plan(task: DenoiseTask, card: ModelCard, box: int, pixel_size: float) -> ScalePlan:
    """How a stack of ``box`` pixels at ``pixel_size`` Angstrom reaches ``task``'s network
    (:func:`~cryo_lightning.data.resample.plan_scale` with the card's pixel-size range and the
    network's fixed box ``L``, if it has one, and the card's ``max_box``)."""
    return plan_scale(box, pixel_size, card.pixel_size_range, getattr(task.net, "L", None), card.max_box)


def _fmt(bounds: tuple[float, float], unit: str = "") -> str:
    lo, hi = bounds
    return f"{lo:g}{unit}" if math.isclose(lo, hi) else f"{lo:g}-{hi:g}{unit}"


def range_warnings(card: ModelCard, plan: ScalePlan, snr: float | None = None) -> list[str]:
    """One line each when the input's pixel size (beyond 1%), box (at the model's pixel size) or
    estimated SNR (beyond a factor 2: the estimate is rough) lies outside what ``card`` says the
    model was trained on, naming both; ranges the card does not know are not checked."""
    lines = []
    name = card.name
    if not in_range(plan.pixel_size, card.pixel_size_range):
        lines.append(f"pixel size {plan.pixel_size:.3g} A is outside the range model {name} was trained at "
                     f"({_fmt(card.pixel_size_range, ' A')}); the model sees the particles resampled to "
                     f"{plan.model_pixel_size:.3g} A")
    capped = card.max_box is not None and plan.model_box == card.max_box
    if capped and plan.crop < plan.box:
        lines.append(f"model {name} works at boxes up to {card.max_box}: the {plan.box}-pixel particles "
                     f"({plan.box * plan.pixel_size:.0f} A) are cropped to the {plan.crop * plan.pixel_size:.0f} A "
                     f"it sees at {plan.model_pixel_size:.3g} A/px")
    if card.box is not None and plan.model_box != card.box:
        lines.append(f"box {plan.model_box} at the model's pixel size ({plan.model_pixel_size:.3g} A) differs from "
                     f"the training box {card.box} of model {name}")
    elif plan.crop != plan.box and not capped:
        lines.append(f"model {name} has a fixed box of {plan.model_box} pixels at {_fmt(card.pixel_size_range, ' A')}: "
                     f"the {plan.box}-pixel particles ({plan.box * plan.pixel_size:.0f} A) are "
                     f"{'cropped' if plan.crop < plan.box else 'zero-padded'} to the "
                     f"{plan.crop * plan.pixel_size:.0f} A it sees")
    if snr is not None and card.snr_range is not None and not card.snr_range[0] / 2 <= snr <= 2 * card.snr_range[1]:
        lines.append(f"estimated SNR {snr:.3g} of the particles is outside the range model {name} was trained at "
                     f"({_fmt(card.snr_range)}, by more than a factor 2)")
    return lines
