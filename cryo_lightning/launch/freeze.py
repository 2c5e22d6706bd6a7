"""Freeze a ``cryol <verb>`` command into one resolved config that a requeued job can rerun.

The command's config is resolved once, at submission (LightningCLI ``--print_config``), then
rewritten so that everything the job writes lands in its folder at fixed paths: a requeued
run finds its own ``last.ckpt`` and keeps logging into the same logger version.
"""

from __future__ import annotations

import contextlib
import copy
import getpass
import io
import random
import tempfile
from pathlib import Path
from typing import Any

import yaml

from cryo_lightning.io.errors import InputError
from cryo_lightning.launch.spec import SlurmSpec

__all__ = ["resolve_config", "job_config", "write_frozen", "CONFIG_NAME", "CHECKPOINT_DIR", "LOG_DIR", "STAGE_VAR",
           "RESUME_CALLBACK"]

CONFIG_NAME = "config.yaml"  # in the job folder
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
STAGE_VAR = "CRYOL_STAGE_DIR"  # exported by the batch script, expanded by the DataModule
# TensorBoard appends to a fixed version folder, so a requeued run continues the same curves;
# CSVLogger deletes an existing metrics.csv, so each attempt gets its own version_N folder.
_FILE_LOGGERS = {"TensorBoardLogger": ("tensorboard", "tensorboard"), "CSVLogger": ("csv", None)}
# Named, not imported: submitting must not import Lightning before it has to.
RESUME_CALLBACK = "cryo_lightning.launch.checkpoint.ResumeCheckpoint"


def resolve_config(argv: list[str]) -> dict[str, Any]:
    """The fully resolved config of ``cryol <verb> ARGS`` (``argv = [verb, *ARGS]``), as a dict.

    Parse errors exit like ``cryol <verb>`` itself does (message on stderr, status 2).
    """
    from cryo_lightning.cli import main  # lazy: the CLI imports the tools, which import this module

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            main([*argv, "--print_config"])
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise
    config = yaml.safe_load(buffer.getvalue())
    if not isinstance(config, dict) or "trainer" not in config:
        raise InputError(f"cryol {' '.join(argv)} did not resolve to a trainer config:\n{buffer.getvalue()[:2000]}")
    return config


def _class_name(entry: Any) -> str:
    return str(entry.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(entry, dict) else ""


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def job_config(config: dict[str, Any], spec: SlurmSpec, folder: Path, verb: str) -> dict[str, Any]:
    """A copy of the resolved ``config`` rewritten for a job in ``folder``.

    - ``trainer.devices``/``num_nodes``/``accelerator`` follow the allocation (one task per GPU);
    - ``default_root_dir`` is the folder; TensorBoard logs go to ``folder/logs/tensorboard``
      (one folder for all attempts: requeued runs continue the same curves), CSV logs to
      ``folder/logs/csv/version_N`` (one per attempt: CSVLogger would delete older metrics);
    - every ModelCheckpoint writes to ``folder/checkpoints``; for ``fit``, a
      :class:`~cryo_lightning.launch.checkpoint.ResumeCheckpoint` there owns ``last.ckpt``
      (ModelCheckpoints stop writing ``last``; without any, Lightning adds none);
    - on Slurm, Lightning's own auto-requeue is switched off (submitit owns requeueing);
    - with ``spec.stage``, the DataModule's ``cache_dir`` points to node-local disk
      (``$CRYOL_STAGE_DIR`` on Slurm, set per node by the batch script).
    """
    config = copy.deepcopy(config)
    trainer = config["trainer"]
    folder = Path(folder).resolve()
    trainer["devices"] = spec.tasks
    trainer["num_nodes"] = spec.nodes
    trainer["accelerator"] = "gpu" if spec.gpus_per_node else "cpu"
    trainer["default_root_dir"] = str(folder)

    logger = trainer.get("logger")
    if logger is None or logger is True:
        logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {}}
    if logger is not False:
        for entry in _as_list(logger):
            if _class_name(entry) in _FILE_LOGGERS:  # others (W&B, MLflow, ...) keep their own run identity
                subdir, version = _FILE_LOGGERS[_class_name(entry)]
                entry.setdefault("init_args", {}).update(save_dir=str(folder / LOG_DIR), name=subdir, version=version)
        trainer["logger"] = logger

    checkpoints = folder / CHECKPOINT_DIR
    callbacks = [c for c in _as_list(trainer.get("callbacks")) if _class_name(c) != "ResumeCheckpoint"]
    model_checkpoints = [c for c in callbacks if _class_name(c).endswith("ModelCheckpoint")]
    for entry in model_checkpoints:
        entry.setdefault("init_args", {}).update(dirpath=str(checkpoints), save_last=False)
    if verb == "fit":
        callbacks.append({"class_path": RESUME_CALLBACK,
                          "init_args": {"dirpath": str(checkpoints), "every_n_train_steps": spec.checkpoint_every}})
        if not model_checkpoints:  # Lightning's default one would add per-epoch files in logs/
            trainer["enable_checkpointing"] = False
    trainer["callbacks"] = callbacks

    if spec.preset.executor == "slurm":
        plugins = [p for p in _as_list(trainer.get("plugins")) if _class_name(p) != "SLURMEnvironment"]
        plugins.append({"class_path": "lightning.pytorch.plugins.environments.SLURMEnvironment",
                        "init_args": {"auto_requeue": False}})
        trainer["plugins"] = plugins

    if spec.stage:
        init_args = (config.get("data") or {}).get("init_args") or {}
        if "cache_dir" not in init_args:
            raise InputError(f"--stage needs a data module with a cache_dir option (ParticleDataModule); "
                             f"{(config.get('data') or {}).get('class_path')} has none")
        if spec.preset.executor == "slurm":  # the node's scratch folder, exported by the batch script
            init_args["cache_dir"] = "${" + STAGE_VAR + "}"
        else:
            init_args["cache_dir"] = str(Path(spec.stage_dir or tempfile.gettempdir()) / f"cryol-{getpass.getuser()}")
    return config


def write_frozen(config: dict[str, Any], folder: Path) -> Path:
    """Write ``config`` to ``folder/config.yaml`` and return its path.

    ``seed_everything: true`` is replaced by a drawn seed, so the frozen config reproduces the
    run. A folder that already holds a run continues it only if its config is the same (a
    drawn seed is kept); a different run there is refused.
    """
    path = Path(folder) / CONFIG_NAME
    existing = yaml.safe_load(path.read_text()) if path.is_file() else None
    if config.get("seed_everything") is True:
        seed = (existing or {}).get("seed_everything")
        config = dict(config, seed_everything=seed if isinstance(seed, int) else random.randrange(2**31))
    if existing is not None:
        if config != existing:
            raise InputError(f"{folder} holds a different run (its {CONFIG_NAME} differs from this command's); "
                             "choose another --folder, or submit the same command to continue that run")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
