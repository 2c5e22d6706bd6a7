"""What ``cryol submit`` knows about each cluster: how GPUs are requested, defaults, limits.

Facts marked ``[unverified]`` come from public job scripts or general knowledge, not from the
centre's documentation; docs/slurm.md lists them. Everything here can be overridden on the
command line (``--partition``, ``--cpus-per-task``, ``--sbatch '{"key": "value"}'``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryo_lightning.io.errors import InputError

__all__ = ["ClusterPreset", "CLUSTERS", "LOCAL_CLUSTERS", "get_cluster"]


@dataclass(frozen=True)
class ClusterPreset:
    """Defaults and rules of one cluster (or of a local executor).

    Attributes:
        name: the ``--cluster`` value.
        description: one line for ``--help`` and docs.
        executor: ``"slurm"``, ``"local"`` (subprocesses on this machine) or ``"debug"``
            (in this process, one task).
        partition: default ``--partition`` (None: the cluster's default partition).
        typed_gpus: the cluster requires a GPU type, as in ``--gpus-per-node=A100:4``.
        default_gpu_type: GPU type used when ``typed_gpus`` and no ``--gpu-type`` is given.
        max_gpus_per_node: GPUs of the largest node (requests above it are refused).
        cpus_per_task: default CPU cores per task (one task per GPU); per GPU type when the
            cluster's node types differ (key ``""`` is the fallback).
        max_time: the longest wall time the cluster accepts, ``D-HH:MM:SS`` (None: unknown).
        account_required: jobs without ``--account`` are refused by the cluster.
        account_example: what a project account looks like, for messages.
        node_local: shell expression of a node-local scratch folder (dataset staging).
        setup: shell lines run in the batch script before ``srun`` (e.g. ``module purge``).
        notes: caveats printed by ``--dry-run`` (e.g. the node architecture).
    """

    name: str
    description: str
    executor: str = "slurm"
    partition: str | None = None
    typed_gpus: bool = False
    default_gpu_type: str | None = None
    max_gpus_per_node: int | None = None
    cpus_per_task: dict[str, int] = field(default_factory=lambda: {"": 8})
    max_time: str | None = None
    account_required: bool = False
    account_example: str = ""
    node_local: str = "${TMPDIR:-/tmp}"
    setup: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def cpus_for(self, gpu_type: str | None) -> int:
        """Default CPU cores per task for nodes with ``gpu_type`` GPUs."""
        return self.cpus_per_task.get(gpu_type or "", self.cpus_per_task[""])


CLUSTERS: dict[str, ClusterPreset] = {
    "arrhenius": ClusterPreset(
        name="arrhenius",
        description="NAISS Arrhenius: GPU nodes are NVIDIA Grace Hopper (aarch64)",
        # [unverified] GPU partition name, GPUs per node (4 GH200 per node assumed), cores per
        # GPU (72-core Grace per superchip; 16 leaves room), node-local scratch, max wall time.
        max_gpus_per_node=4,
        cpus_per_task={"": 16},
        account_required=True,
        account_example="naiss2026-x-yyy",
        notes=(
            "Arrhenius GPU nodes are aarch64: the Python environment (or --container image) that "
            "runs the job must be built for aarch64, not copied from an x86_64 login node or cluster.",
        ),
    ),
    "berzelius": ClusterPreset(
        name="berzelius",
        description="NSC Berzelius: DGX A100 nodes, 8 x A100 (x86_64)",
        # Public job scripts use `--gpus=N` and `-C thin|fat`; `--gpus-per-node` is the standard
        # Slurm form of the same GRES request [unverified on Berzelius]. 3 days is the longest
        # wall time seen in public scripts [unverified as the limit]; /scratch/local is the
        # node-local NVMe disk [unverified].
        max_gpus_per_node=8,
        cpus_per_task={"": 16},
        max_time="3-00:00:00",
        account_required=True,
        account_example="berzelius-2026-123",
        node_local="/scratch/local",
    ),
    "alvis": ClusterPreset(
        name="alvis",
        description="C3SE Alvis (being retired in 2026): typed GPUs, e.g. --gpu-type A100 (x86_64)",
        partition="alvis",
        typed_gpus=True,
        default_gpu_type="A100",
        max_gpus_per_node=8,  # T4 nodes; A100/A40 nodes have 4
        # [unverified] cores per GPU by node type (A100/A40 nodes: 64 cores for 4 GPUs).
        cpus_per_task={"": 16, "T4": 4, "V100": 8},
        max_time="7-00:00:00",
        account_required=True,
        account_example="NAISS2026-22-123",
        node_local="${TMPDIR:-/tmp}",  # $TMPDIR: the job's node-local disk
        setup=("module purge",),
        notes=("Alvis compute nodes are being withdrawn during 2026: plan runs on Arrhenius.",),
    ),
    "generic": ClusterPreset(
        name="generic",
        description="any Slurm cluster with GPUs requested as --gpus-per-node=N",
    ),
}

LOCAL_CLUSTERS: dict[str, ClusterPreset] = {
    "local": ClusterPreset(
        name="local", executor="local",
        description="this machine: one subprocess per task (submitit LocalExecutor; for testing)",
        max_gpus_per_node=None, cpus_per_task={"": 1},
    ),
    "debug": ClusterPreset(
        name="debug", executor="debug",
        description="this process, one task (submitit DebugExecutor; for debugging)",
        cpus_per_task={"": 1},
    ),
}


def get_cluster(name: str) -> ClusterPreset:
    """The preset called ``name`` (a cluster, ``local`` or ``debug``)."""
    presets = {**CLUSTERS, **LOCAL_CLUSTERS}
    if name not in presets:
        raise InputError(f"unknown cluster {name!r}; choose one of {', '.join(presets)}")
    return presets[name]
