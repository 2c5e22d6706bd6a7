"""`cryol models`: the registry as a table and as JSON."""

from __future__ import annotations

import json

from cryo_lightning.cli import main
from cryo_lightning.tasks.model_registry import MANIFEST_ENV

ENTRY = {"name": "tiny-unet", "file": "tiny-unet.pt", "kind": "single-image", "description": "a test U-Net",
         "config": "configs/denoise_unet_cpu.yaml",
         "train_command": "cryol fit --config configs/base/denoise_synthetic_l32.yaml --config configs/denoise_unet_cpu.yaml",
         "wall_time": "2 min, 2 CPU cores", "box": 64, "pixel_size_range": [4.0, 6.0], "snr_range": [0.01, 0.25],
         "set_size": 1, "held_out": {"rel_mse": 0.512345, "molecules": 8}}


def _registry(tmp_path, models, default):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"default": default, "models": models}))
    return path


def test_models_table_and_json(tmp_path, monkeypatch, capsys):
    other = {**ENTRY, "name": "set-net", "kind": "set", "set_size": 32, "box": 32, "held_out": {},
             "pixel_size_range": [6.0, 6.0], "snr_range": None, "train_command": None}
    monkeypatch.setenv(MANIFEST_ENV, str(_registry(tmp_path, [ENTRY, other], "tiny-unet")))
    main(["models"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Shipped denoisers ({tmp_path / 'models.json'}; * = default):"
    assert lines[1].split() == ["name", "kind", "box", "pixel", "size", "(A)", "SNR", "set", "config"]
    assert lines[2].split() == ["*", "tiny-unet", "single-image", "64", "4-6", "0.01-0.25", "1",
                                "configs/denoise_unet_cpu.yaml"]
    assert lines[4].strip() == "held out: rel_mse 0.5123, molecules 8"
    assert lines[5].strip() == ("trained by: cryol fit --config configs/base/denoise_synthetic_l32.yaml "
                                "--config configs/denoise_unet_cpu.yaml (2 min, 2 CPU cores)")
    assert lines[6].split() == ["set-net", "set", "32", "6", "?", "32", "configs/denoise_unet_cpu.yaml"]
    main(["models", "--json"])
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == ["tiny-unet", "set-net"] and [m["default"] for m in listed] == [True, False]
    assert listed[0]["pixel_size_range"] == [4.0, 6.0] and listed[0]["file"] == str(tmp_path / "tiny-unet.pt")
    assert listed[1]["snr_range"] is None and listed[1]["set_size"] == 32


def test_models_without_any(tmp_path, capsys):
    main(["models", "--manifest", str(_registry(tmp_path, [], None))])
    assert "No denoisers are shipped yet" in capsys.readouterr().out
    main(["models", "--manifest", str(tmp_path / "models.json"), "--json"])
    assert json.loads(capsys.readouterr().out) == []
