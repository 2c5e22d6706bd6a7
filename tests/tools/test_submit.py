"""`cryol submit`: valid batch scripts for every cluster (--dry-run), and real runs through
submitit's debug (in-process) and local (two DDP processes) executors."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from cryo_lightning.cli import main as cryol

TINY = Path(__file__).parents[1] / "launch" / "tiny_fit.yaml"
FIT = ["--", "fit", "--config", str(TINY)]

CASES = {  # cluster options, expected #SBATCH lines
    "arrhenius": (["--account", "naiss2026-1-2", "--nodes", "2", "--gpus-per-node", "4", "--time", "12:00:00"],
                  ["--account=naiss2026-1-2", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=720"]),
    "berzelius": (["--account", "berzelius-2026-1", "--nodes", "2", "--gpus-per-node", "8", "--time", "1-00:00:00",
                   "--constraint", "fat"],
                  ["--account=berzelius-2026-1", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8",
                   "--time=1440", "--constraint=fat", "--cpus-per-task=16"]),
    "alvis": (["--account", "NAISS2026-22-1", "--gpus-per-node", "4", "--gpu-type", "A40", "--time", "06:00:00"],
              ["--account=NAISS2026-22-1", "--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=A40:4",
               "--partition=alvis", "--time=360"]),
    "generic": (["--nodes", "3", "--gpus-per-node", "2", "--time", "00:30:00", "--partition", "gpu",
                 "--container", "/images/cryo lightning.sif", "--sbatch", '{"qos": "short"}'],
                ["--nodes=3", "--ntasks-per-node=2", "--gpus-per-node=2", "--time=30", "--partition=gpu",
                 "--qos=short"]),
}


@pytest.mark.parametrize("cluster", list(CASES))
def test_dry_run_prints_a_valid_sbatch_script(cluster, tmp_path, capsys):
    options, expected = CASES[cluster]
    folder = tmp_path / "job"
    cryol(["submit", "--cluster", cluster, *options, "--folder", str(folder), "--dry-run", *FIT])
    out, err = capsys.readouterr()
    script = tmp_path / "job.sh"
    script.write_text(out)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    sbatch = set(re.findall(r"^#SBATCH (\S+)$", out, flags=re.M))
    for line in [*expected, "--signal=USR2@120", "--requeue"]:  # --time is in minutes
        assert line in sbatch, (line, sorted(sbatch))
    srun = [line for line in out.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and "-m submitit.core._submit" in srun[0] and str(folder / "submitit") in srun[0]
    frozen = yaml.safe_load(err[err.index("# job folder"):])  # the frozen config, printed on stderr
    nodes, gpus = (int(re.search(rf"^#SBATCH --{k}=\S*?(\d+)$", out, re.M).group(1))
                   for k in ("nodes", "gpus-per-node"))
    assert (frozen["trainer"]["num_nodes"], frozen["trainer"]["devices"]) == (nodes, gpus)
    assert not folder.exists()  # a dry run writes nothing
    if cluster == "generic":
        assert "apptainer exec --nv '/images/cryo lightning.sif' python -u -m submitit" in srun[0]


def test_bad_commands_fail_with_one_line(tmp_path, capsys):
    for args, message in [
        (["submit", "--cluster", "generic", "--dry-run"], "after '--'"),
        (["submit", "--cluster", "generic", "--dry-run", "--", "simulate", "--out", "x"], "trainer verb"),
        (["submit", "--cluster", "berzelius", "--dry-run", *FIT], "needs --account"),
        (["submit", "--cluster", "generic", "--time", "12h", "--dry-run", *FIT], "--time expects"),
    ]:
        with pytest.raises(SystemExit) as stop:
            cryol(args)
        assert stop.value.code == 2 and message in capsys.readouterr().err, args


def test_debug_executor_runs_fit_and_a_resubmission_continues(tmp_path, capsys):
    folder = tmp_path / "job"
    args = ["submit", "--cluster", "debug", "--gpus-per-node", "0", "--time", "00:10:00", "--folder", str(folder)]
    cryol([*args, *FIT])
    last = folder / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 6
    assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["default_root_dir"] == str(folder)
    assert list((folder / "submitit").glob("*_0_log.out"))
    capsys.readouterr()
    cryol([*args, *FIT])  # same command, same folder: continues that run
    assert f"resuming from {last} (global step 6)" in capsys.readouterr().out
    again = (folder / "submit.yaml").read_text().splitlines()[0]  # "# cryol submit --config ..."
    assert again == f"# cryol submit --config {folder}/submit.yaml -- fit --config {folder}/config.yaml"
    cryol(again[len("# cryol "):].split())  # the frozen job, submitted again from its own folder
    assert f"resuming from {last} (global step 6)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        cryol([*args, *FIT, "--trainer.max_steps", "8"])
    assert stop.value.code == 2 and "holds a different run" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_local_executor_runs_fit_with_two_ddp_processes(tmp_path):
    folder = tmp_path / "job"
    cryol(["submit", "--cluster", "local", "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "00:10:00",
           "--folder", str(folder), "--wait", *FIT])
    logs = "".join(p.read_text() for p in (folder / "submitit").glob("*_log.*"))
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs
    assert "max_steps=6` reached" in logs
    assert torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 6


@pytest.mark.parametrize("preset", sorted((Path(__file__).parents[2] / "configs" / "cluster").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_cluster_presets_give_valid_jobs(preset, tmp_path, capsys):
    cryol(["submit", "--config", str(preset), "--account", "proj-1", "--folder", str(tmp_path / "job"), "--dry-run",
           *FIT])
    out, err = capsys.readouterr()
    frozen = yaml.safe_load(err[err.index("# job folder"):])
    settings = yaml.safe_load(preset.read_text())
    assert frozen["trainer"]["devices"] == (settings.get("tasks_per_node") or settings["gpus_per_node"])
    if settings["cluster"] == "local":
        assert out == ""  # no batch script without Slurm
    else:
        assert f"--gpus-per-node={'A100:' if settings['cluster'] == 'alvis' else ''}{settings['gpus_per_node']}" in out
        script = tmp_path / "job.sh"
        script.write_text(out)
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_stage_exports_the_node_local_folder(tmp_path):
    from cryo_lightning.launch.spec import SlurmSpec
    from cryo_lightning.launch.submit import PreparedJob, render_sbatch

    spec = SlurmSpec(cluster="berzelius", account="a", gpus_per_node=8, stage=True,
                     setup=["source /proj/p/env/bin/activate"])
    script = render_sbatch(PreparedJob(spec, "fit", tmp_path, {}, []))
    setup = script[script.index("# setup"):script.index("# command")]
    assert 'export CRYOL_STAGE_DIR="/scratch/local/cryol-$USER"' in setup
    assert "source /proj/p/env/bin/activate" in setup and "export OMP_NUM_THREADS=16" in setup
