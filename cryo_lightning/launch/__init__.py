"""Scale-out: submit ``cryol`` trainer runs to Slurm clusters with submitit (``cryol submit``).

Layering: the top of the house, above the CLI that it runs inside jobs (``launch/job.py``,
``launch/freeze.py``); ``launch/command.py`` is the ``cryol submit`` front end, which the CLI's
verb table names. Nothing below imports this package.
"""

from cryo_lightning.launch.clusters import CLUSTERS, ClusterPreset, get_cluster
from cryo_lightning.launch.job import TrainJob
from cryo_lightning.launch.spec import SlurmSpec, parse_time
from cryo_lightning.launch.submit import PreparedJob, make_executor, prepare, render_sbatch, submit

__all__ = ["CLUSTERS", "ClusterPreset", "get_cluster", "TrainJob", "SlurmSpec", "parse_time", "PreparedJob",
           "make_executor", "prepare", "render_sbatch", "submit"]
