"""Submit a frozen ``cryol <verb>`` run with submitit: Slurm, a local executor, or in-process.

One task per GPU; the trainer's ``devices``/``num_nodes`` follow the allocation; the resolved
config, submitit's logs, Lightning's logs and the checkpoints all live in the job folder; on
the time-limit signal submitit requeues the job, which resumes from ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cryo_lightning.io.errors import InputError
from cryo_lightning.launch.freeze import (CHECKPOINT_DIR, CONFIG_NAME, STAGE_VAR, job_config, resolve_config,
                                          write_frozen)
from cryo_lightning.launch.job import TrainJob
from cryo_lightning.launch.spec import SlurmSpec

if TYPE_CHECKING:
    import submitit

__all__ = ["VERBS", "PreparedJob", "prepare", "make_executor", "render_sbatch", "submit"]

VERBS = ("fit", "validate", "test", "predict")
SUBMITIT_DIR = "submitit"  # in the job folder: batch script, pickles, per-task stdout/stderr


@dataclass
class PreparedJob:
    """A resolved job, not yet written or submitted.

    Attributes:
        spec: the allocation.
        verb: the ``cryol`` verb.
        folder: the job folder (absolute).
        config: the frozen config (a dict).
        warnings: doubtful requests (printed, not fatal).
    """

    spec: SlurmSpec
    verb: str
    folder: Path
    config: dict[str, Any]
    warnings: list[str]

    @property
    def job(self) -> TrainJob:
        checkpoints = str(self.folder / CHECKPOINT_DIR) if self.verb == "fit" else None
        return TrainJob(self.verb, str(self.folder / CONFIG_NAME), checkpoints)


def prepare(spec: SlurmSpec, command: list[str]) -> PreparedJob:
    """Check ``spec``, resolve ``command`` (``[verb, *cryol options]``) and rewrite it for the job."""
    if not command or command[0] not in VERBS:
        got = " ".join(command) or "nothing"
        raise InputError(f"cryol submit runs a trainer verb ({', '.join(VERBS)}) after '--', "
                         f"e.g. cryol submit ... -- fit --config configs/quickstart.yaml; got {got}")
    warnings = spec.validate()
    verb = command[0]
    resolved = resolve_config(command)
    name = spec.job_name or f"cryol-{verb}"
    if spec.folder:
        folder = Path(spec.folder)
    else:
        root = Path(resolved["trainer"].get("default_root_dir") or "runs")
        folder = root / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    folder = folder.expanduser().resolve()
    return PreparedJob(spec, verb, folder, job_config(resolved, spec, folder, verb), warnings)


def _setup_lines(spec: SlurmSpec) -> list[str]:
    lines = [f"# cryol submit: --cluster {spec.cluster}, {spec.nodes} node(s) x {spec.gpus_per_node} GPU(s), "
             f"{spec.tasks} task(s) per node, --time {spec.time}", *spec.preset.setup, *spec.setup,
             f"export OMP_NUM_THREADS={spec.cpus}"]
    if spec.stage:
        lines.append(f'export {STAGE_VAR}="{spec.stage_dir or spec.preset.node_local}/cryol-$USER"')
    return lines


def _python(spec: SlurmSpec) -> str | None:
    if spec.python:
        return spec.python
    if spec.container:
        return f"apptainer exec --nv {shlex.quote(spec.container)} python"
    return None  # submitit: this interpreter


def _slurm_parameters(spec: SlurmSpec, job_name: str) -> dict[str, Any]:
    preset = spec.preset
    gpus: int | str = spec.gpus_per_node
    if preset.typed_gpus:
        gpus = f"{spec.gpu_type_or_default}:{spec.gpus_per_node}"
    params: dict[str, Any] = {
        "job_name": job_name, "nodes": spec.nodes, "ntasks_per_node": spec.tasks, "gpus_per_node": gpus,
        "cpus_per_task": spec.cpus, "time": spec.minutes, "signal_delay_s": spec.signal_delay,
        "setup": _setup_lines(spec),
        # --requeue makes the job eligible for `scontrol requeue` (and for requeue after node failure).
        "additional_parameters": {"requeue": True, **spec.sbatch},
    }
    optional = {"partition": spec.partition or preset.partition, "account": spec.account,
                "constraint": spec.constraint, "mem": f"{spec.mem_gb}GB" if spec.mem_gb else None}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def make_executor(prepared: PreparedJob, render_only: bool = False) -> "submitit.Executor":
    """The submitit executor for ``prepared.spec.cluster``, parameters set.

    ``render_only`` builds a Slurm executor without checking for ``srun`` (for ``--dry-run``
    on machines without Slurm); it must not be used to submit.
    """
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    spec, folder = prepared.spec, prepared.folder / SUBMITIT_DIR
    job_name = spec.job_name or f"cryol-{prepared.verb}"
    if spec.preset.executor == "debug":
        return submitit.DebugExecutor(folder)
    if spec.preset.executor == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=spec.max_requeues, python=_python(spec))
        executor.update_parameters(timeout_min=spec.minutes, tasks_per_node=spec.tasks,
                                   gpus_per_node=spec.gpus_per_node, signal_delay_s=spec.signal_delay)
        return executor

    cls = SlurmExecutor
    if render_only:
        class _RenderOnly(SlurmExecutor):
            @classmethod
            def affinity(cls) -> int:  # skip submitit's "is srun on PATH" check
                return 1

        cls = _RenderOnly
    executor = cls(folder, max_num_timeout=spec.max_requeues, python=_python(spec))
    executor.update_parameters(**_slurm_parameters(spec, job_name))
    return executor


def render_sbatch(prepared: PreparedJob) -> str:
    """The batch script submitit would hand to ``sbatch`` for this job."""
    if prepared.spec.preset.executor != "slurm":
        raise InputError(f"--cluster {prepared.spec.cluster} runs without Slurm: there is no batch script")
    executor = make_executor(prepared, render_only=True)
    # submitit's own renderer (private API, submitit 1.5): exactly the text `submit` would send.
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def submit(prepared: PreparedJob, wait: bool = False) -> "submitit.Job":
    """Write the job folder (frozen config, ``submit.yaml``) and submit the job.

    ``submit.yaml`` holds the options with the resolved folder, so
    ``cryol submit --config <folder>/submit.yaml -- <verb> --config <folder>/config.yaml``
    submits the same job again (it continues from ``last.ckpt``).

    Args:
        prepared: from :func:`prepare`.
        wait: block until the job ends (always true for ``--cluster debug``, which runs here).

    Returns:
        the submitit job.
    """
    from submitit.helpers import clean_env

    write_frozen(prepared.config, prepared.folder)
    options = yaml.safe_dump({**asdict(prepared.spec), "folder": str(prepared.folder)}, sort_keys=False)
    folder = prepared.folder
    again = f"cryol submit --config {folder}/submit.yaml -- {prepared.verb} --config {folder}/{CONFIG_NAME}"
    (folder / "submit.yaml").write_text(f"# {again}\n{options}")
    executor = make_executor(prepared)
    with clean_env():  # a job submitted from inside a job must not inherit its SLURM_* variables
        job = executor.submit(prepared.job)
    print(f"cryol submit: job {job.job_id} ({prepared.spec.cluster}), folder {prepared.folder}", file=sys.stderr)
    print(f"  logs: {prepared.folder / SUBMITIT_DIR}/{job.job_id}_<task>_log.out|err, "
          f"{prepared.folder}/logs; checkpoints: {prepared.folder / CHECKPOINT_DIR}", file=sys.stderr)
    if wait or prepared.spec.preset.executor == "debug":
        job.results()  # raises if a task failed
    return job
