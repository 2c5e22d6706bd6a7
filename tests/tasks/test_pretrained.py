"""The registry of shipped denoisers, the one denoiser loader, weights-only exports and the real models.json.

References: checkpoints written by `cryol fit` (as users get them), manifests written here, and
bit-identical outputs between a checkpoint and its export.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from cryo_lightning.cli import main
from cryo_lightning.data.preprocess import background_stats
from cryo_lightning.io.errors import InputError
from cryo_lightning.io.mrc import read_stack
from cryo_lightning.models.unet import UNet
from cryo_lightning.tasks.model_registry import (MANIFEST, MANIFEST_ENV, default_model_name, list_models,
                                                 resolve_checkpoint)
from cryo_lightning.tasks.pretrained import export_weights, load_denoise_task, load_denoiser, load_pretrained
from cryo_lightning.tasks.self_supervised import SelfSupervisedDenoiseTask
from cryo_lightning.tools.denoise import denoise_particles

UNET_CONFIG = """
trainer: {accelerator: cpu, max_steps: 2, limit_val_batches: 0, logger: false, enable_progress_bar: false,
          callbacks: [{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: ckpt, save_last: true}}]}
model:
  class_path: cryo_lightning.tasks.denoise.DenoiseTask
  init_args:
    net: {class_path: cryo_lightning.models.unet.UNet, init_args: {depth: 2, channels: 4}}
data:
  class_path: cryo_lightning.data.synthetic.SyntheticSetDataModule
  init_args: {box: 24, batch_size: 2, train_sets_per_epoch: 4, n_train_molecules: 2, pixel_size_range: [3.0, 8.0],
              simulation: {set_size: 4, snr: [0.05, 0.2]}}
"""

JOINT_CONFIG = """
trainer: {accelerator: cpu, max_steps: 1, limit_val_batches: 0, logger: false, enable_progress_bar: false,
          callbacks: [{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: ckpt, save_last: true}}]}
model:
  class_path: cryo_lightning.tasks.joint.JointTask
  init_args:
    denoiser: {class_path: cryo_lightning.models.dncnn.DnCNN, init_args: {depth: 3, channels: 8}}
    steps: 1
    channels: 2
    denoiser_steps: 1
data:
  class_path: cryo_lightning.data.joint_examples.JointDataModule
  init_args: {box: 16, n_images: 32, set_size: 16, batch_size: 1, n_train_molecules: 2, train_examples: 1,
              pixel_size: 6.0}
"""


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory, cryol_fit):
    return cryol_fit(tmp_path_factory.mktemp("unet"), UNET_CONFIG)


def _manifest(folder, weights, default="tiny-unet") -> os.PathLike:
    entry = {"name": "tiny-unet", "file": weights.name, "kind": "single-image", "description": "a test U-Net",
             "config": "tests/tasks/test_pretrained.py", "train_command": "cryol fit --config tiny.yaml",
             "wall_time": "10 s, 2 CPU cores", "box": 64, "pixel_size_range": [4.0, 6.0], "snr_range": [0.05, 0.5],
             "set_size": 1, "held_out": {"rel_mse": 0.5}}
    other = {**entry, "name": "other", "kind": "set", "set_size": 16, "held_out": {}}
    path = folder / "models.json"
    path.write_text(json.dumps({"default": default, "models": [entry, other]}))
    return path


@pytest.fixture(scope="module")
def registry(unet_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("registry")
    weights = export_weights(unet_checkpoint, folder / "tiny-unet.pt")
    return _manifest(folder, weights)


def test_fit_checkpoints_record_their_training_data(unet_checkpoint):
    checkpoint = torch.load(unet_checkpoint, weights_only=True)
    assert checkpoint["training_data"] == {"box": 24, "pixel_size_range": [3.0, 8.0], "snr_range": [0.05, 0.2],
                                           "set_size": 4}
    task, card = load_denoiser(str(unet_checkpoint))
    assert isinstance(task.net, UNet) and not task.training
    assert (card.kind, card.box, card.pixel_size_range, card.snr_range, card.set_size) == \
        ("single-image", 24, (3.0, 8.0), (0.05, 0.2), 1)


def test_export_weights_is_weights_only_and_bit_identical(unet_checkpoint, tmp_path):
    out = export_weights(unet_checkpoint, tmp_path / "w.pt")
    exported = torch.load(out, weights_only=True)
    assert set(exported) == {"state_dict", "hyper_parameters", "pytorch-lightning_version", "training_data"}
    assert "optimizer_states" in torch.load(unet_checkpoint, weights_only=True)  # the original has them
    assert out.stat().st_size < unet_checkpoint.stat().st_size
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    a, b = load_denoise_task(unet_checkpoint, torch.device("cpu")), load_denoise_task(out, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert load_denoiser(str(out))[1].pixel_size_range == (3.0, 8.0)  # the export keeps the training data
    with pytest.raises(FileExistsError):
        export_weights(unet_checkpoint, out)


def test_export_of_a_joint_checkpoint_is_a_denoise_task(tmp_path, cryol_fit):
    ckpt = cryol_fit(tmp_path, JOINT_CONFIG)
    out = export_weights(ckpt, tmp_path / "joint.pt")
    exported = torch.load(out, weights_only=True)
    assert exported["hyper_parameters"]["_class_path"] == "cryo_lightning.tasks.denoise.DenoiseTask"
    assert all(k.startswith("net.") for k in exported["state_dict"])
    assert exported["training_data"] == {"box": 16, "pixel_size": 6.0, "snr_range": [0.1, 0.1], "set_size": 16}
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cpu = torch.device("cpu")
        assert torch.equal(load_denoise_task(ckpt, cpu)(x), load_denoise_task(out, cpu)(x))


def test_registry_cards_default_and_names(registry, monkeypatch):
    cards = list_models(registry)
    assert [c.name for c in cards] == ["tiny-unet", "other"] and [c.default for c in cards] == [True, False]
    card = cards[0]
    assert (card.kind, card.box, card.pixel_size_range, card.snr_range, card.set_size, card.held_out) == \
        ("single-image", 64, (4.0, 6.0), (0.05, 0.5), 1, {"rel_mse": 0.5})
    assert card.file == registry.parent / "tiny-unet.pt"
    assert json.loads(json.dumps(card.to_dict()))["pixel_size_range"] == [4.0, 6.0]
    assert default_model_name(registry) == "tiny-unet"
    monkeypatch.setenv(MANIFEST_ENV, str(registry))
    for spec in (None, "tiny-unet", "pretrained:tiny-unet"):
        task, card = load_denoiser(spec)
        assert card.name == "tiny-unet" and card.pixel_size_range == (4.0, 6.0) and isinstance(task.net, UNet)
    assert load_pretrained()[1].name == "tiny-unet"


def test_unknown_name_lists_the_available_ones(registry):
    with pytest.raises(InputError, match=r"unknown model 'nope'; available: tiny-unet, other"):
        load_pretrained("nope", manifest=registry)
    with pytest.raises(InputError, match=r"nope.ckpt: no such checkpoint file, and not a shipped model .*tiny-unet"):
        load_denoiser("nope.ckpt", manifest=registry)


def test_no_default_and_bad_manifests(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"default": None, "models": []}))
    with pytest.raises(InputError, match=r"no default denoiser in .*empty.json \(none is shipped yet\)"):
        load_pretrained(manifest=empty)
    with pytest.raises(InputError, match=r"unknown model 'x'; available: none"):
        load_pretrained("x", manifest=empty)
    bad = tmp_path / "bad.json"
    for models, default, message in (([{"name": "a", "file": "a.pt"}], None, "missing kind"),
                                     ([{"name": "a", "file": "a.pt", "kind": "3d"}], None, "kind must be one of"),
                                     ([{"name": "a", "file": "a.pt", "kind": "set", "snr_range": [2, 1]}], None,
                                      "snr_range must be"),
                                     ([], "a", "default 'a' is not one of")):
        bad.write_text(json.dumps({"default": default, "models": models}))
        with pytest.raises(InputError, match=message):
            list_models(bad)
    with pytest.raises(InputError, match=r"tiny-unet.*missing from the installation"):
        load_pretrained("tiny-unet", manifest=_manifest(tmp_path, tmp_path / "absent.pt"))


def test_init_ckpt_takes_a_shipped_name(registry, monkeypatch):
    monkeypatch.setenv(MANIFEST_ENV, str(registry))
    weights = registry.parent / "tiny-unet.pt"
    assert resolve_checkpoint("pretrained:tiny-unet") == resolve_checkpoint("tiny-unet") == weights
    assert str(resolve_checkpoint("runs/x/last.ckpt")) == "runs/x/last.ckpt"  # paths pass through
    shipped = load_pretrained("tiny-unet")[0].net.state_dict()
    for spec in ("tiny-unet", "pretrained:tiny-unet"):
        task = SelfSupervisedDenoiseTask(UNet(depth=2, channels=4), init_ckpt=spec)
        task.configure_model()
        assert all(torch.equal(v, shipped[k]) for k, v in task.net.state_dict().items())


def test_shipped_registry_is_valid():
    cards = list_models(MANIFEST)  # parses, and every listed weights file is installed
    assert all(card.file.is_file() for card in cards)
    assert default_model_name(MANIFEST) in [None, *(c.name for c in cards)]


def test_every_shipped_model_loads_and_denoises(tmp_path, monkeypatch):
    """Each model of the real models.json denoises a simulated stack (8 images, box 64, SNR 1/8):
    finite output at the input's shape, closer to the clean images than the noisy input is."""
    monkeypatch.delenv(MANIFEST_ENV, raising=False)
    cards = list_models(MANIFEST)
    assert cards, f"{MANIFEST} lists no model yet: export one with export_weights and add its entry"
    for card in cards:
        lo, hi = card.pixel_size_range or (4.0, 4.0)
        sim = tmp_path / f"sim_{card.name}"
        main(["simulate", "--volume", "random", "--n-images", "8", "--box", "64", "--pixel-size",
              f"{math.sqrt(lo * hi):.3f}", "--snr", "0.125", "--out", str(sim), "--seed", "0"])
        stack, _ = denoise_particles(None, str(sim / "particles.star"), str(tmp_path / f"out_{card.name}"),
                                     model=card.name, device="cpu")
        denoised, noisy, clean = (read_stack(p) for p in (stack, sim / "particles.mrcs", sim / "particles_clean.mrcs"))
        assert denoised.shape == (8, 64, 64) and bool(torch.isfinite(denoised).all())
        mean, std = background_stats(noisy)
        target = (clean - mean) / std
        mse_denoised = float((denoised - target).square().mean())
        mse_noisy = float(((noisy - mean) / std - target).square().mean())
        assert mse_denoised < mse_noisy, (card.name, mse_denoised, mse_noisy)


def test_inference_settings_of_a_card_are_applied_and_checked(unet_checkpoint, tmp_path):
    """A card's ``inference`` entry sets the loaded network's attributes; a setting the network
    does not have, or a value of another type, is refused with the model's name."""
    weights = export_weights(unet_checkpoint, tmp_path / "tiny-unet.pt")
    path = _manifest(tmp_path, weights)
    data = json.loads(path.read_text())
    data["models"][0]["inference"] = {"depth": 2}
    path.write_text(json.dumps(data))
    task, card = load_pretrained(manifest=path)
    assert card.inference == {"depth": 2} and task.net.depth == 2
    for bad, message in (({"sure_blend": True}, "UNet has no inference setting 'sure_blend'"),
                         ({"head": 1}, "no inference setting 'head'"),
                         ({"depth": "two"}, "depth must be int")):
        data["models"][0]["inference"] = bad
        path.write_text(json.dumps(data))
        with pytest.raises(InputError, match=rf"model 'tiny-unet' .*{message}"):
            load_pretrained(manifest=path)


def test_shipped_guided_models_blend_by_sure():
    for card in list_models(MANIFEST):
        task, _ = load_pretrained(card.name)
        if hasattr(task.net, "sure_blend"):
            assert card.inference.get("sure_blend") is True and task.net.sure_blend
