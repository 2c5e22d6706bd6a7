"""`cryol`: the overview lists every subcommand; trainer verbs run from the committed configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cryo_lightning.cli import TOOLS, TRAINER_VERBS, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_help_lists_every_subcommand(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name in [*TRAINER_VERBS, *TOOLS]:
        line = next(l for l in out.splitlines() if l.strip().startswith(name + " "))
        assert len(line.split(maxsplit=1)[1]) > 10  # one line of help each


def test_unknown_subcommand_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as err:
        main(["reconstrukt"])
    assert err.value.code == 2 and "unknown subcommand" in capsys.readouterr().err


def test_console_script_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "cryo_lightning", "--help"], capture_output=True, text=True, check=True)
    assert "simulate" in out.stdout and "fit" in out.stdout


def test_print_config_resolves_quickstart(capsys):
    with pytest.raises(SystemExit) as err:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--print_config"])
    assert err.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "cryo_lightning.tasks.joint.JointTask"
    assert config["model"]["init_args"]["denoiser"]["class_path"] == "cryo_lightning.models.dncnn.DnCNN"
    assert config["data"]["init_args"]["set_size"] == 32


def test_fit_quickstart_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config writes under runs/
    main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.fast_dev_run", "2",
          "--trainer.accelerator", "cpu"])


def test_fit_then_validate_from_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["--data.init_args.n_images", "64", "--data.init_args.set_size", "16", "--trainer.limit_val_batches", "1",
             "--trainer.accelerator", "cpu"]
    overrides = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
                 "--data.init_args.train_examples", "3", "--model.init_args.denoiser_steps", "1",
                 "--model.init_args.reconstructor_steps", "1", *small]
    main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), *overrides])
    run = tmp_path / "runs" / "quickstart"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    # the end-of-fit report of the main job (tasks/joint_report.py)
    for name in ("map.mrc", "map_truth.mrc", "fsc.png", "gallery.png", "metrics.json"):
        assert (run / name).is_file(), name
    main(["validate", "--config", str(CONFIGS / "quickstart.yaml"), "--ckpt_path", str(ckpt), *small])
