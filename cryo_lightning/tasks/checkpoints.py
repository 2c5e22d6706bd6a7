"""Reading ``cryol fit`` task checkpoints: the weights of one network, and the task that wrote them
(old checkpoints of renamed tasks included, :data:`RENAMED_TASKS`)."""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cryo_lightning.io.errors import InputError, path_problem

__all__ = ["DENOISER_PREFIXES", "RECONSTRUCTOR_PREFIXES", "RENAMED_TASKS", "read_checkpoint", "task_name",
           "current_task_name", "alias_renamed_tasks", "load_task_weights"]

# where each task keeps the network: DenoiseTask/ReconstructorTask `net`, JointTask `denoiser`/`reconstructor`
DENOISER_PREFIXES = ("net", "denoiser")
RECONSTRUCTOR_PREFIXES = ("net", "reconstructor")
# tasks renamed since checkpoints recorded them: the class path an old checkpoint holds -> the current one
RENAMED_TASKS = {
    "cryo_lightning.tasks.reconstruct.ReconstructTask": "cryo_lightning.tasks.reconstructor.ReconstructorTask",
}


def read_checkpoint(path: str | Path, option: str = "--ckpt", mmap: bool = True) -> dict[str, Any]:
    """The tensors and plain values of a ``cryol fit`` checkpoint (no code in it runs), checked.

    Every way a checkpoint file can be wrong gives one message naming the option and the file:
    missing, a folder (the checkpoints in it are named), empty, truncated or not a PyTorch file,
    holding Python objects, or a PyTorch file that ``cryol fit`` did not write.

    Raises:
        InputError: as above.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("*.ckpt"))[:3]
        hint = f"e.g. {', '.join(map(str, found))}" if found else "there is no .ckpt file in it"
        raise InputError(f"{option} {path} is a folder: give a checkpoint file ({hint})")
    problem = path_problem(path)
    if problem:
        raise InputError(f"{option} {path} {problem}")
    if not path.is_file():
        raise InputError(f"{option} {path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{option} {path} is empty (0 bytes): the run that wrote it was probably stopped while "
                         "saving; use another checkpoint (e.g. last.ckpt, or an earlier epoch's)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, with its index at the end
        raise InputError(f"{option} {path} is not a PyTorch checkpoint: truncated (an interrupted copy or save?) "
                         "or another kind of file")
    try:  # tensors and plain values only, as Lightning loads checkpoints: no code runs
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise InputError(f"{option} {path}: holds Python objects besides weights (a task built in code keeps its "
                         "network object in the hyperparameters); use a checkpoint written by `cryol fit`") from err
    except Exception as err:  # a damaged archive: torch raises RuntimeError, EOFError, ...
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise InputError(f"{option} {path} cannot be read as a PyTorch checkpoint ({first}); it is probably "
                         "damaged: use another copy") from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= checkpoint.keys():
        raise InputError(f"{option} {path} is a PyTorch file but not a `cryol fit` checkpoint (no state_dict and "
                         "hyper_parameters); give runs/<name>/checkpoints/last.ckpt or a shipped model name")
    return checkpoint


def task_name(checkpoint: dict[str, Any]) -> str:
    """The task class a checkpoint was written by (e.g. ``"DenoiseTask"``; ``""`` if unrecorded)."""
    return str(checkpoint.get("hyper_parameters", {}).get("_class_path", "")).rsplit(".", 1)[-1]


def current_task_name(checkpoint: dict[str, Any]) -> str:
    """:func:`task_name` under the class's current name (:data:`RENAMED_TASKS` applied)."""
    stored = str(checkpoint.get("hyper_parameters", {}).get("_class_path", ""))
    return RENAMED_TASKS.get(stored, stored).rsplit(".", 1)[-1]


def alias_renamed_tasks() -> None:
    """Let the class paths that old checkpoints record resolve to the renamed task classes.

    ``load_from_checkpoint`` and ``cryol fit --ckpt_path`` (LightningCLI) look up a checkpoint's
    ``_class_path``. For each entry of :data:`RENAMED_TASKS` whose old module is gone, this puts a
    stand-in for that module into ``sys.modules`` whose old class name gives the current class
    (imported on first use). Calling it again changes nothing.
    """
    for old, new in RENAMED_TASKS.items():
        old_module, old_name = old.rsplit(".", 1)
        if old_module not in sys.modules and importlib.util.find_spec(old_module) is not None:
            continue  # the old module still exists
        stand_in = sys.modules.setdefault(old_module, _RenamedTasks(old_module))
        if isinstance(stand_in, _RenamedTasks):
            stand_in.renamed[old_name] = new


class _RenamedTasks(types.ModuleType):
    """Stands in for a module that renamed tasks left: its old class names give the current classes."""

    def __init__(self, name: str) -> None:
        super().__init__(name, "renamed task classes, for old checkpoints")
        self.renamed: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        renamed = self.__dict__.get("renamed", {})
        if name not in renamed:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        module, cls = renamed[name].rsplit(".", 1)
        return getattr(importlib.import_module(module), cls)


def load_task_weights(module: nn.Module, path: str | Path, prefixes: tuple[str, ...], option: str) -> dict[str, Any]:
    """Load the weights and buffers stored under the first of ``prefixes`` that the checkpoint has.

    Args:
        module: the network to fill, in place.
        path: a checkpoint written by ``cryol fit``.
        prefixes: state-dict prefixes to look for, in order (e.g. :data:`DENOISER_PREFIXES`).
        option: the config option that named ``path`` (for messages), e.g. ``"init_ckpt"``.
    Returns:
        the checkpoint's hyperparameters.
    Raises:
        InputError: ``path`` is not a file or not a ``cryol fit`` checkpoint with such weights, or
            they do not fit ``module`` (the message names the keys or shapes that differ).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise InputError(f"{option} {path}: no such file. Give a checkpoint written by `cryol fit` (e.g. "
                         "runs/quickstart/checkpoints/last.ckpt after `make demo`), or null to start from the "
                         "network's initial weights.")
    checkpoint = read_checkpoint(path, option, mmap=False)
    weights, hparams = checkpoint.get("state_dict", {}), checkpoint.get("hyper_parameters", {})
    prefix = next((p for p in prefixes if any(k.startswith(p + ".") for k in weights)), None)
    if prefix is None:
        raise InputError(f"{option} {path}: no {' or '.join(repr(p + '.*') for p in prefixes)} weights; give the "
                         "checkpoint of a task that trains this network")
    state = {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(own.keys() & state.keys())
              if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        details = "; ".join(f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                            for what, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("shapes (checkpoint vs model)", shapes)) if keys)
        stored = hparams.get(prefix)
        raise InputError(f"{option} {path}: its network{f' {stored}' if stored else ''} does not fit the "
                         f"configured {type(module).__name__} ({details}). Configure the same network as the "
                         "run that wrote the checkpoint.")
    module.load_state_dict(state)
    return dict(hparams)
