"""The resources and options of one ``cryol submit`` job, checked against its cluster's preset."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cryo_lightning.io.errors import InputError
from cryo_lightning.launch.clusters import ClusterPreset, get_cluster

__all__ = ["SlurmSpec", "parse_time"]

_TIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})$")


def parse_time(text: str) -> int:
    """Wall time ``HH:MM:SS`` or ``D-HH:MM:SS`` -> whole minutes (rounded up, at least 1)."""
    match = _TIME.match(text.strip())
    if not match:
        raise InputError(f"--time expects HH:MM:SS or D-HH:MM:SS (e.g. 12:00:00 or 2-00:00:00), got {text!r}")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    if minutes > 59 or seconds > 59:
        raise InputError(f"--time {text!r}: minutes and seconds must be below 60")
    total_s = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return max(1, -(-total_s // 60))


@dataclass
class SlurmSpec:
    """One job's allocation and launch options (the ``cryol submit`` options before ``--``).

    The allocation is the single source of truth for the process layout: one task per GPU,
    and the trainer's ``devices``/``num_nodes`` are set to ``tasks_per_node``/``nodes``.

    Args:
        cluster: a preset of :mod:`cryo_lightning.launch.clusters` (``arrhenius``,
            ``berzelius``, ``alvis``, ``generic``) or ``local`` / ``debug`` for testing.
        nodes: nodes of the allocation.
        gpus_per_node: GPUs per node (0: CPU only, only sensible for ``local``/``debug``).
        tasks_per_node: processes per node; defaults to ``gpus_per_node`` (one task per GPU),
            must be given for CPU-only runs with more than one process.
        time: wall time ``HH:MM:SS`` or ``D-HH:MM:SS``; the job is requeued when it runs out.
        account: project account (``-A``).
        partition: partition (``-p``); the preset's when None.
        gpu_type: GPU type for clusters with typed GPU requests (Alvis: ``A100``, ``A40``, ...).
        constraint: node feature (``-C``), e.g. ``fat`` on Berzelius.
        cpus_per_task: CPU cores per task (DataLoader workers + main process); preset default.
        mem_gb: memory per node in GB (None: the cluster's default).
        job_name: Slurm job name (default ``cryol-<verb>``).
        folder: job folder for the frozen config, logs and checkpoints (default
            ``<trainer.default_root_dir>/<job_name>-<date>-<time>``).
        setup: shell lines run before ``srun`` (load modules, activate the environment).
        container: Apptainer image; tasks then run ``apptainer exec --nv IMAGE python``.
        python: command that runs Python on the compute nodes (overrides ``container``;
            default: this interpreter, so the same environment must exist there).
        stage: copy the particles to node-local disk first (ParticleDataModule ``cache_dir``).
        stage_dir: node-local folder for ``stage`` (default: the preset's scratch folder).
        checkpoint_every: steps between the resume checkpoints (``last.ckpt``).
        max_requeues: how often a job that reaches its time limit is requeued.
        signal_delay: seconds before the time limit at which the requeue signal is sent.
        sbatch: further ``#SBATCH`` options, e.g. ``{"qos": "short"}``.
    """

    cluster: str = "generic"
    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int | None = None
    time: str = "04:00:00"
    account: str | None = None
    partition: str | None = None
    gpu_type: str | None = None
    constraint: str | None = None
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    job_name: str | None = None
    folder: str | None = None
    setup: list[str] = field(default_factory=list)
    container: str | None = None
    python: str | None = None
    stage: bool = False
    stage_dir: str | None = None
    checkpoint_every: int = 500
    max_requeues: int = 10
    signal_delay: int = 120
    sbatch: dict[str, str] = field(default_factory=dict)

    @property
    def preset(self) -> ClusterPreset:
        return get_cluster(self.cluster)

    @property
    def tasks(self) -> int:
        """Processes per node (= trainer ``devices``)."""
        return self.tasks_per_node if self.tasks_per_node is not None else max(self.gpus_per_node, 1)

    @property
    def minutes(self) -> int:
        return parse_time(self.time)

    @property
    def gpu_type_or_default(self) -> str | None:
        return self.gpu_type or self.preset.default_gpu_type

    @property
    def cpus(self) -> int:
        """CPU cores per task: ``cpus_per_task`` or the preset's default for the GPU type."""
        return self.cpus_per_task if self.cpus_per_task is not None else self.preset.cpus_for(self.gpu_type_or_default)

    def validate(self) -> list[str]:
        """Raise :class:`InputError` for impossible requests; return warnings for doubtful ones."""
        preset, warnings = self.preset, []
        for name in ("nodes", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0 or self.tasks < 1 or self.max_requeues < 0 or self.signal_delay < 0:
            raise InputError("--gpus-per-node, --max-requeues and --signal-delay must be >= 0, --tasks-per-node >= 1")
        if self.gpus_per_node and self.tasks != self.gpus_per_node:
            raise InputError(f"one task per GPU: --tasks-per-node ({self.tasks}) must equal --gpus-per-node "
                             f"({self.gpus_per_node}) when GPUs are requested")
        if preset.executor == "slurm" and self.gpus_per_node == 0:
            raise InputError(f"--cluster {self.cluster}: request GPUs with --gpus-per-node N "
                             "(CPU-only runs: --cluster local)")
        if preset.max_gpus_per_node and self.gpus_per_node > preset.max_gpus_per_node:
            raise InputError(f"--cluster {self.cluster} has at most {preset.max_gpus_per_node} GPUs per node, "
                             f"got --gpus-per-node {self.gpus_per_node} (use more --nodes)")
        if preset.executor != "slurm" and self.nodes != 1:
            raise InputError(f"--cluster {self.cluster} runs on this machine: --nodes must be 1")
        if preset.executor == "debug" and self.tasks != 1:
            raise InputError("--cluster debug runs one task in this process: use --cluster local for several")
        if preset.account_required and not self.account:
            raise InputError(f"--cluster {self.cluster} needs --account (your project, e.g. {preset.account_example})")
        if self.gpu_type and not preset.typed_gpus:
            warnings.append(f"--gpu-type is ignored on --cluster {self.cluster} (use --constraint to pick node types)")
        if preset.max_time and self.minutes > parse_time(preset.max_time):
            warnings.append(f"--time {self.time} is longer than {preset.max_time}, the longest job {self.cluster} "
                            "is known to accept; the job is requeued at its time limit anyway")
        if self.signal_delay * 2 > self.minutes * 60:
            raise InputError(f"--signal-delay {self.signal_delay}s leaves no time to train within --time {self.time}")
        return warnings
