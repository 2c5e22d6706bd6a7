"""The registry of shipped denoisers (``models.json``) and the :class:`ModelCard` that describes a denoiser.

The registry is ``cryo_lightning/pretrained/models.json`` (installed with the package; the
environment variable ``CRYOL_MODELS`` or a ``manifest`` argument points at another one)::

    {"default": "<name>" | null,
     "models": [{"name", "file", "kind", "description", "config", "train_command", "wall_time",
                 "box", "pixel_size_range", "snr_range", "set_size", "max_box", "inference", "held_out"}, ...]}

``file`` is a weights-only checkpoint (:func:`~cryo_lightning.tasks.pretrained.export_weights`)
relative to the manifest's folder; ``kind`` is ``"single-image"`` or ``"set"``; ``box`` the
training box (pixels); ``pixel_size_range`` ``[lo, hi]`` Angstrom per pixel and ``snr_range``
``[lo, hi]`` (the SNR of docs/conventions.md §7) of the training data; ``set_size`` the context
images per set the model wants at inference (1 for single-image networks); ``inference`` settings
of the network applied when it is loaded (its attributes, e.g. ``{"sure_blend": true}`` for a
:class:`~cryo_lightning.models.guided_unet.GuidedUNet`); ``held_out`` free-form numbers measured
on held-out data. The shipped models are loaded by :mod:`cryo_lightning.tasks.pretrained`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryo_lightning.io.errors import InputError

__all__ = ["KINDS", "MANIFEST", "MANIFEST_ENV", "PREFIX", "ModelCard", "manifest_path", "list_models",
           "default_model_name", "find_model", "resolve_checkpoint"]

KINDS = ("single-image", "set")
MANIFEST = Path(__file__).resolve().parents[1] / "pretrained" / "models.json"
MANIFEST_ENV = "CRYOL_MODELS"
PREFIX = "pretrained:"


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
