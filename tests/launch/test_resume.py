"""A job killed mid-epoch resumes from its last.ckpt at the same step and trains on."""

from __future__ import annotations

import csv
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import torch

from cryo_lightning.launch.freeze import write_frozen
from cryo_lightning.launch.job import TrainJob
from cryo_lightning.launch.spec import SlurmSpec
from cryo_lightning.launch.submit import prepare

TINY = Path(__file__).with_name("tiny_fit.yaml")

# The first attempt: what the job runs (`cryol fit --config FROZEN`), plus a callback that
# SIGKILLs the process after optimizer step 5, i.e. between two resume checkpoints (every 2).
KILLED_ATTEMPT = """
import os, signal, sys
import lightning.pytorch as pl

class KillAfterStep5(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 5:
            os.kill(os.getpid(), signal.SIGKILL)

from cryo_lightning.cli import main
main(["fit", "--config", sys.argv[1], "--trainer.callbacks+=__main__.KillAfterStep5"])
"""


def _steps_logged(folder: Path) -> list[int]:
    with open(folder / "metrics.csv") as f:
        return sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")})


def test_killed_mid_epoch_resumes_at_its_checkpoint_step(tmp_path, capsys):
    spec = SlurmSpec(cluster="debug", gpus_per_node=0, time="00:10:00", checkpoint_every=2,
                     folder=str(tmp_path / "job"))
    prepared = prepare(spec, ["fit", "--config", str(TINY), "--trainer.max_steps", "11"])
    frozen = write_frozen(prepared.config, prepared.folder)
    job, last = prepared.job, prepared.folder / "checkpoints" / "last.ckpt"
    assert job.command() == ["fit", "--config", str(frozen)]  # nothing to resume yet

    killed = subprocess.run([sys.executable, "-c", KILLED_ATTEMPT, str(frozen)], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = torch.load(last, map_location="cpu", weights_only=False)
    batches_per_epoch = 400 // 2
    assert state["global_step"] == 4 and state["epoch"] == 0 and 4 < batches_per_epoch  # mid-epoch

    assert job.command()[-2:] == ["--ckpt_path", str(last)]
    job()  # the requeued attempt (what submitit runs after a requeue), in this process
    assert f"resuming from {last} (global step 4)" in capsys.readouterr().out
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == 11  # written at the end although 11 is not a multiple of 2
    # The resumed attempt logged from step 4 on: it did not start over from step 0.
    attempts = sorted((prepared.folder / "logs" / "csv").glob("version_*"))
    assert _steps_logged(attempts[-1]) == list(range(4, 11))
    assert not list(last.parent.glob("*.partial"))


def test_checkpoint_requeues_the_same_job():
    job = TrainJob("fit", "/jobs/a/config.yaml", "/jobs/a/checkpoints")
    delayed = job.checkpoint()  # what submitit calls in rank 0 on the time-limit signal
    assert repr(delayed.function) == repr(job) and delayed.args == () and delayed.kwargs == {}
    assert len(pickle.dumps(job)) < 300  # strings only: nothing heavy goes to the cluster
