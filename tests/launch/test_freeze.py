"""Freezing a cryol command for a job: layout follows the allocation, outputs at fixed paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cryo_lightning.io.errors import InputError
from cryo_lightning.launch.freeze import RESUME_CALLBACK, job_config, resolve_config, write_frozen
from cryo_lightning.launch.spec import SlurmSpec

TINY = Path(__file__).with_name("tiny_fit.yaml")


@pytest.fixture(scope="module")
def resolved():
    return resolve_config(["fit", "--config", str(TINY)])


def test_resolve_config_gives_the_full_lightning_config(resolved):
    assert resolved["trainer"]["max_steps"] == 6
    assert resolved["model"]["init_args"]["net"]["init_args"] == {"depth": 2, "channels": 4}
    assert resolved["data"]["init_args"]["num_workers"] == 0  # defaults filled in


def test_resolve_config_reports_bad_options_like_cryol_fit(capsys):
    with pytest.raises(SystemExit) as stop:
        resolve_config(["fit", "--config", str(TINY), "--trainer.no_such_option", "1"])
    assert stop.value.code == 2 and "no_such_option" in capsys.readouterr().err


def test_trainer_layout_follows_the_allocation(resolved, tmp_path):
    spec = SlurmSpec(cluster="berzelius", account="a", nodes=2, gpus_per_node=8)
    config = job_config(resolved, spec, tmp_path, "fit")
    trainer = config["trainer"]
    assert (trainer["devices"], trainer["num_nodes"], trainer["accelerator"]) == (8, 2, "gpu")
    assert trainer["default_root_dir"] == str(tmp_path.resolve())
    # submitit owns requeueing on Slurm; Lightning's auto-requeue is off
    assert trainer["plugins"] == [{"class_path": "lightning.pytorch.plugins.environments.SLURMEnvironment",
                                   "init_args": {"auto_requeue": False}}]
    local = job_config(resolved, SlurmSpec(cluster="local", gpus_per_node=0, tasks_per_node=2), tmp_path, "fit")
    assert (local["trainer"]["devices"], local["trainer"]["accelerator"]) == (2, "cpu")
    assert "plugins" not in local["trainer"] or not local["trainer"]["plugins"]
    assert resolved["trainer"]["devices"] == 1  # the input is not modified


def test_outputs_go_to_fixed_paths_in_the_job_folder(resolved, tmp_path):
    config = job_config(resolved, SlurmSpec(cluster="debug", gpus_per_node=0, checkpoint_every=7), tmp_path, "fit")
    trainer, folder = config["trainer"], tmp_path.resolve()
    csv = trainer["logger"]["init_args"]
    assert (csv["save_dir"], csv["name"], csv["version"]) == (str(folder / "logs"), "csv", None)
    resume = trainer["callbacks"][-1]
    assert resume == {"class_path": RESUME_CALLBACK,
                      "init_args": {"dirpath": str(folder / "checkpoints"), "every_n_train_steps": 7}}
    assert trainer["enable_checkpointing"] is False  # no ModelCheckpoint: no per-epoch files from Lightning


def test_tensorboard_keeps_one_version_and_model_checkpoints_move(resolved, tmp_path):
    base = dict(resolved, trainer=dict(resolved["trainer"], logger=None, callbacks=[
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "elsewhere", "monitor": "val/rel_mse", "save_last": True}}]))
    config = job_config(base, SlurmSpec(cluster="debug", gpus_per_node=0), tmp_path, "fit")
    trainer, folder = config["trainer"], tmp_path.resolve()
    assert trainer["logger"]["class_path"].endswith("TensorBoardLogger")
    assert trainer["logger"]["init_args"] == {"save_dir": str(folder / "logs"), "name": "tensorboard",
                                              "version": "tensorboard"}
    best = trainer["callbacks"][0]["init_args"]
    assert best == {"dirpath": str(folder / "checkpoints"), "monitor": "val/rel_mse", "save_last": False}
    assert "enable_checkpointing" not in trainer or trainer["enable_checkpointing"] is not False
    # freezing twice does not add a second resume callback
    again = job_config(config, SlurmSpec(cluster="debug", gpus_per_node=0), tmp_path, "fit")
    assert sum(c["class_path"] == RESUME_CALLBACK for c in again["trainer"]["callbacks"]) == 1


def test_other_verbs_get_no_resume_checkpoint(resolved, tmp_path):
    config = job_config(resolved, SlurmSpec(cluster="debug", gpus_per_node=0), tmp_path, "validate")
    assert not any(c["class_path"] == RESUME_CALLBACK for c in config["trainer"]["callbacks"])


def test_resume_callback_name_is_the_class():
    from cryo_lightning.launch.checkpoint import ResumeCheckpoint

    assert RESUME_CALLBACK == f"{ResumeCheckpoint.__module__}.{ResumeCheckpoint.__name__}"


def test_stage_points_the_particle_cache_to_node_local_disk(resolved, tmp_path):
    with pytest.raises(InputError, match="cache_dir"):
        job_config(resolved, SlurmSpec(cluster="debug", gpus_per_node=0, stage=True), tmp_path, "fit")
    particles = dict(resolved, data={"class_path": "cryo_lightning.data.particles.ParticleDataModule",
                                     "init_args": {"path": "p.star", "cache_dir": None}})
    spec = SlurmSpec(cluster="generic", stage=True)
    assert job_config(particles, spec, tmp_path, "fit")["data"]["init_args"]["cache_dir"] == "${CRYOL_STAGE_DIR}"
    spec = SlurmSpec(cluster="local", gpus_per_node=0, stage=True, stage_dir=str(tmp_path / "scratch"))
    local = job_config(particles, spec, tmp_path, "fit")["data"]["init_args"]["cache_dir"]
    assert Path(local).parent == tmp_path / "scratch"  # no batch script to export the variable


def test_write_frozen_draws_a_seed_once_and_refuses_a_different_run(resolved, tmp_path):
    config = job_config(dict(resolved, seed_everything=True), SlurmSpec(cluster="debug", gpus_per_node=0),
                        tmp_path, "fit")
    path = write_frozen(config, tmp_path)
    seed = yaml.safe_load(path.read_text())["seed_everything"]
    assert isinstance(seed, int) and not isinstance(seed, bool)
    assert write_frozen(config, tmp_path) == path  # same command again: continue, same seed
    assert yaml.safe_load(path.read_text())["seed_everything"] == seed
    changed = dict(config, trainer=dict(config["trainer"], max_steps=99))
    with pytest.raises(InputError, match="holds a different run"):
        write_frozen(changed, tmp_path)
