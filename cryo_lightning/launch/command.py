"""``cryol submit``: run a trainer verb on a Slurm cluster (DDP, one task per GPU) with submitit.

Example::

    cryol submit --cluster berzelius --account berzelius-2026-123 --nodes 2 --gpus-per-node 8 \\
        --time 12:00:00 -- fit --config configs/base/denoise_synthetic_l64.yaml \\
        --config configs/denoise_transformer.yaml

Everything after ``--`` is the ``cryol`` command. Its config is resolved now and frozen into
the job folder; the trainer's devices and nodes follow the allocation; the job is requeued at
its time limit and resumes from ``<folder>/checkpoints/last.ckpt``. ``--dry-run`` prints the
batch script instead of submitting. ``--cluster local`` (subprocesses here) and ``debug`` (this
process) run the same job without Slurm. Options may come from ``--config
configs/cluster/<name>.yaml``.
"""

from __future__ import annotations

import sys
from dataclasses import fields

import yaml

from cryo_lightning.io.errors import InputError
from cryo_lightning.launch.clusters import CLUSTERS, LOCAL_CLUSTERS
from cryo_lightning.launch.spec import SlurmSpec
from cryo_lightning.launch.submit import prepare, render_sbatch, submit
from cryo_lightning.tools.common import add_flag, tool_parser

__all__ = ["main", "build_parser"]


def build_parser():
    """The ``cryol submit`` option parser (options before ``--``)."""
    p = tool_parser("cryol submit", __doc__, particles=False)
    p.add_argument("--cluster", default="generic", choices=[*CLUSTERS, *LOCAL_CLUSTERS],
                   help="cluster preset (local/debug: run here, for testing)")
    p.add_argument("--nodes", type=int, default=1, help="nodes")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node (one task per GPU)")
    p.add_argument("--tasks-per-node", type=int | None, default=None,
                   help="processes per node (default: --gpus-per-node; for CPU-only local runs)")
    p.add_argument("--time", type=str, default="04:00:00", help="wall time HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--account", type=str | None, default=None, help="project account (sbatch -A)")
    p.add_argument("--partition", type=str | None, default=None, help="partition (default: the preset's)")
    p.add_argument("--gpu-type", type=str | None, default=None,
                   help="GPU type where the cluster needs one (Alvis: A100, A40, ...)")
    p.add_argument("--constraint", type=str | None, default=None, help="node feature (sbatch -C), e.g. fat")
    p.add_argument("--cpus-per-task", type=int | None, default=None, help="CPU cores per task (default: the preset's)")
    p.add_argument("--mem-gb", type=int | None, default=None, help="memory per node, GB (default: the cluster's)")
    p.add_argument("--job-name", type=str | None, default=None, help="Slurm job name (default cryol-<verb>)")
    p.add_argument("--folder", type=str | None, default=None,
                   help="job folder (default <trainer.default_root_dir>/<job-name>-<date>-<time>); "
                        "an existing job folder with the same config continues that run")
    p.add_argument("--setup", type=list[str], default=[],
                   help='shell lines run before srun, e.g. \'["module load X", "source env/bin/activate"]\'')
    p.add_argument("--container", type=str | None, default=None, help="Apptainer image to run the tasks in")
    p.add_argument("--python", type=str | None, default=None,
                   help="command running Python on the nodes (default: this interpreter)")
    add_flag(p, "--stage", False, "cache the particles on node-local disk first (ParticleDataModule)")
    p.add_argument("--stage-dir", type=str | None, default=None, help="node-local folder for --stage")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between resume checkpoints")
    p.add_argument("--max-requeues", type=int, default=10, help="requeues after hitting the time limit")
    p.add_argument("--signal-delay", type=int, default=120, help="seconds before the time limit to requeue")
    p.add_argument("--sbatch", type=dict[str, str], default={}, help='extra #SBATCH options, e.g. \'{"qos": "short"}\'')
    add_flag(p, "--dry-run", False, "print the batch script (and frozen config) instead of submitting")
    add_flag(p, "--wait", False, "wait for the job to end (local and debug clusters)")
    return p


def main(argv: list[str] | None = None) -> None:
    """Parse ``cryol submit`` arguments, then print the batch script or submit the job."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        if not any(a in ("-h", "--help") for a in args):
            raise InputError("cryol submit needs the command to run after '--', e.g. "
                             "cryol submit --cluster generic --time 01:00:00 -- fit --config configs/quickstart.yaml")
        build_parser().parse_args(args)  # prints help and exits
    split = args.index("--")
    options = build_parser().parse_args(args[:split])
    spec = SlurmSpec(**{f.name: getattr(options, f.name) for f in fields(SlurmSpec)})  # same names
    prepared = prepare(spec, args[split + 1:])
    for message in (*prepared.warnings, *spec.preset.notes):
        print(f"cryol submit: note: {message}", file=sys.stderr)
    if options.dry_run:
        if spec.preset.executor == "slurm":
            print(render_sbatch(prepared))
        print(f"# job folder: {prepared.folder}\n# frozen config ({prepared.folder / 'config.yaml'}):",
              file=sys.stderr)
        print(yaml.safe_dump(prepared.config, sort_keys=False), file=sys.stderr)
        return
    submit(prepared, wait=options.wait)
