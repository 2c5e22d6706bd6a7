"""The plain sbatch templates in slurm/: valid bash, one task per GPU, a requeue signal that
reaches the tasks, Lightning's requeue overlay; the generic one trains under a stub srun."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cryo_lightning.launch.freeze import resolve_config

ROOT = Path(__file__).parents[2]
TEMPLATES = sorted((ROOT / "slurm").glob("*.sbatch"))
TINY = Path(__file__).with_name("tiny_fit.yaml")


def test_there_is_a_template_per_cluster():
    assert {p.name for p in TEMPLATES} >= {f"{c}_fit.sbatch" for c in ("arrhenius", "berzelius", "alvis", "generic")}


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_template_is_valid_and_requeues(template):
    text = template.read_text()
    assert subprocess.run(["bash", "-n", str(template)], capture_output=True).returncode == 0
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))
    gpus = int(sbatch["gpus-per-node"].split(":")[-1])
    assert int(sbatch["ntasks-per-node"]) == gpus  # one task per GPU
    assert re.fullmatch(r"USR2@\d+", sbatch["signal"])  # no "B:": srun's tasks get the signal
    assert "requeue" in sbatch and sbatch["open-mode"] == "append"
    assert "--config slurm/lightning_requeue.yaml" in text and re.search(r"^srun ", text, flags=re.M)


def test_requeue_overlay_gives_lightning_the_requeue_signal():
    config = resolve_config(["fit", "--config", str(TINY), "--config", str(ROOT / "slurm" / "lightning_requeue.yaml")])
    (plugin,) = config["trainer"]["plugins"]
    assert plugin["class_path"].endswith("SLURMEnvironment")
    assert plugin["init_args"] == {"auto_requeue": True, "requeue_signal": "SIGUSR2"}


STUB_SRUN = """#!/usr/bin/env bash
# one task: the variables Slurm's srun gives it, then the command
export SLURM_NTASKS=1 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NODELIST=localhost
exec "$@"
"""


def test_generic_template_trains_under_srun(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(STUB_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", OMP_NUM_THREADS="1",
               SLURM_JOB_ID="4242", SLURM_JOB_NAME="cryol-fit", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="1",
               SLURM_CPUS_PER_TASK="1", RUN_DIR=str(tmp_path / "run"))
    args = [str(TINY), "--trainer.accelerator", "cpu", "--trainer.logger", "false"]  # later options win
    done = subprocess.run(["bash", str(ROOT / "slurm" / "generic_fit.sbatch"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "max_steps=6` reached" in done.stdout + done.stderr
    # RUN_DIR is the trainer's default_root_dir, where Lightning's requeue checkpoint would go
    assert list((tmp_path / "run" / "checkpoints").glob("*step=6.ckpt"))
