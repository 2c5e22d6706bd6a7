"""`cryol denoise` on real stacks: valid STAR/MRCS outputs, inputs untouched, context sets."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryo_lightning.abinitio.invariant_features import rotation_invariant_features
from cryo_lightning.cli import main
from cryo_lightning.data.context_sets import context_sets
from cryo_lightning.data.preprocess import background_normalize, background_stats
from cryo_lightning.data.resample import plan_scale
from cryo_lightning.io.mrc import read_stack, write_stack
from cryo_lightning.tasks.model_registry import MANIFEST_ENV
from cryo_lightning.tasks.pretrained import export_weights, load_pretrained
from cryo_lightning.tools.common import open_particle_input


CONFIG = """
trainer: {accelerator: cpu, max_steps: 2, limit_val_batches: 0, logger: false, enable_progress_bar: false,
          callbacks: [{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: ckpt, save_last: true}}]}
model:
  class_path: cryo_lightning.tasks.denoise.DenoiseTask
  init_args:
    net: {class_path: cryo_lightning.models.set_transformer.PolarSetTransformer,
          init_args: {L: 24, n_radii: 13, n_angles: 32, heads: 2, layers: 1}}
data:
  class_path: cryo_lightning.data.synthetic.SyntheticSetDataModule
  init_args: {box: 24, batch_size: 2, train_sets_per_epoch: 4, n_train_molecules: 2,
              simulation: {set_size: 4, pixel_size: 8.0}}
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cryol_fit):
    """A checkpoint written by `cryol fit`, as users get them."""
    return cryol_fit(tmp_path_factory.mktemp("ckpt"), CONFIG)


def _digest(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.mark.parametrize("name,extra", [("relion31.star", []), ("empiar_10076_7.cs", []),
                                        ("hand.5.mrcs", ["--pixel-size", "4.0"])])
def test_denoise_writes_valid_outputs_and_leaves_inputs(shared_data, tmp_path, checkpoint, name, extra):
    source = shared_data / "real" / "cryodrgn"
    inputs = sorted(p for p in source.glob(name.split(".")[0] + ".*") if p.is_file())
    folder = tmp_path / "in"
    folder.mkdir()
    for p in inputs:
        shutil.copy(p, folder / p.name)
    copies = sorted(folder.iterdir())
    before = _digest(copies)
    with tempfile.TemporaryDirectory() as scratch:
        particles = open_particle_input(folder / name, Path(scratch), None, 4.0 if extra else None, None)
        box, pixel = particles.box, float(particles.table.particles["pixel_size_A"].median())
    for scale, out in (([], tmp_path / "out"), (["--model-scale"], tmp_path / "out_model")):
        main(["denoise", "--ckpt", str(checkpoint), "--star", str(folder / name), "--out", str(out),
              "--set-size", "3", "--context", "neighbours", *extra, *scale])
        assert _digest(copies) == before
        stem = name.rsplit(".", 1)[0]
        with mrcfile.open(out / f"{stem}.mrcs") as f:
            n = f.data.shape[0]
            # the input's box and pixel size by default; the set transformer's 24 pixels with --model-scale
            assert f.data.shape[1:] == ((24, 24) if scale else (box, box)) and np.isfinite(f.data).all()
        blocks = starfile.read(out / f"{stem}.star", always_dict=True)
        assert list(blocks) == ["optics", "particles"] and len(blocks["particles"]) == n
        assert int(blocks["optics"]["rlnImageSize"][0]) == (24 if scale else box)
        if not scale:
            assert float(blocks["optics"]["rlnImagePixelSize"][0]) == pytest.approx(pixel, rel=1e-6)


def test_context_sets_partition_and_group_similar_images():
    sets = context_sets(10, 4, "random", seed=1)
    assert sorted(np.concatenate(sets).tolist()) == list(range(10)) and [len(s) for s in sets] == [4, 4, 2]
    # two clusters of rotated copies: neighbour sets never mix them
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 24, 24, generator=g)
    images = torch.stack([torch.rot90(a, k % 4) if k < 8 else torch.rot90(b, k % 4) for k in range(16)])
    images = images + 0.05 * torch.randn(16, 24, 24, generator=g)
    emb = rotation_invariant_features(images)  # the fallback of --context neighbours
    for s in context_sets(16, 8, "neighbours", embedding=emb):
        assert len({int(k) < 8 for k in s}) == 1


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
  init_args: {box: 16, n_images: 32, set_size: 16, batch_size: 1, n_train_molecules: 2, train_examples: 1}
"""


def test_denoise_uses_the_denoiser_of_a_joint_checkpoint(shared_data, tmp_path, cryol_fit):
    # The main job's checkpoint (JointTask) denoises particles like a DenoiseTask's
    ckpt = cryol_fit(tmp_path, JOINT_CONFIG)
    stack = shared_data / "real" / "cryodrgn" / "hand.5.mrcs"
    out = tmp_path / "out"
    main(["denoise", "--ckpt", str(ckpt), "--star", str(stack), "--out", str(out),
          "--set-size", "3", "--pixel-size", "4.0"])
    with mrcfile.open(out / "hand.5.mrcs") as f:
        assert f.data.shape == tuple(read_stack(stack).shape) and np.isfinite(f.data).all()


# CONFIG with the rotational set transformer as the network
ROTATIONAL_CONFIG = CONFIG.replace(
    """net: {class_path: cryo_lightning.models.set_transformer.PolarSetTransformer,
          init_args: {L: 24, n_radii: 13, n_angles: 32, heads: 2, layers: 1}}""",
    """net: {class_path: cryo_lightning.models.rotational_transformer.RotationalSetTransformer,
          init_args: {L: 24, channels: 4, heads: 1, head_dim: 4, layers: 1, classes: 4, hidden: 4}}""")


def test_denoise_serves_the_rotational_transformer_with_its_own_neighbour_embedding(tmp_path, cryol_fit,
                                                                                    monkeypatch):
    """Issue 23, item 4: `--context neighbours` groups particles by the model's learned embedding."""
    import cryo_lightning.models.rotational_transformer as rt

    ckpt = cryol_fit(tmp_path, ROTATIONAL_CONFIG)
    stack = _stack(tmp_path, 24, 8.0, n=10)
    calls = []
    original = rt.RotationalSetTransformer.embedding
    monkeypatch.setattr(rt.RotationalSetTransformer, "embedding",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    main(["denoise", "--ckpt", str(ckpt), "--star", str(stack), "--out", str(tmp_path / "out"),
          "--set-size", "4", "--context", "neighbours"])
    out = read_stack(tmp_path / "out" / stack.name)
    assert calls and out.shape == (10, 24, 24) and torch.isfinite(out).all()


def test_denoise_serves_the_em_guided_transformer_running_em_on_each_set(tmp_path, cryol_fit, monkeypatch):
    """A model trained with cached EM guides computes them itself at inference, with its settings."""
    import cryo_lightning.models.rotational_transformer as rt

    config = ROTATIONAL_CONFIG.replace("classes: 4, hidden: 4}", "classes: 4, hidden: 4, guide: em, em_iterations: 1, "
                                       "em_rotations: 200, em_max_shift: 0.0}")
    assert "guide: em" in config
    ckpt = cryol_fit(tmp_path, config)
    stack = _stack(tmp_path, 24, 8.0, n=10)
    calls = []
    original = rt.RotationalSetTransformer.em_guide
    monkeypatch.setattr(rt.RotationalSetTransformer, "em_guide",
                        lambda self, *a, **k: calls.append(self.em_settings) or original(self, *a, **k))
    main(["denoise", "--ckpt", str(ckpt), "--star", str(stack), "--out", str(tmp_path / "out"),
          "--set-size", "5", "--context", "neighbours"])
    out = read_stack(tmp_path / "out" / stack.name)
    assert out.shape == (10, 24, 24) and torch.isfinite(out).all()
    assert calls and calls[0] == {"iterations": 1, "n_rotations": 200, "max_shift": 0.0}


# -- shipped models, any box and pixel size ----------------------------------------------------

UNET_CONFIG = """
trainer: {accelerator: cpu, max_steps: 1, limit_val_batches: 0, logger: false, enable_progress_bar: false,
          callbacks: [{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: ckpt, save_last: true}}]}
model:
  class_path: cryo_lightning.tasks.denoise.DenoiseTask
  init_args:
    net: {class_path: cryo_lightning.models.unet.UNet, init_args: {depth: 2, channels: 4}}
data:
  class_path: cryo_lightning.data.synthetic.SyntheticSetDataModule
  init_args: {box: 32, batch_size: 1, train_sets_per_epoch: 2, n_train_molecules: 2,
              simulation: {set_size: 2, pixel_size: 5.0}}
"""
CARD = {"name": "tiny-unet", "file": "tiny-unet.pt", "kind": "single-image", "description": "a test U-Net",
        "config": "tests/tools/test_denoise.py", "train_command": "cryol fit --config tiny.yaml",
        "wall_time": "5 s, 2 CPU cores", "box": 64, "pixel_size_range": [4.0, 6.0], "snr_range": [0.05, 0.5],
        "set_size": 1, "held_out": {}}


@pytest.fixture(scope="module")
def unet_registry(tmp_path_factory, cryol_fit):
    """A registry whose default (and only) model is a tiny U-Net, 'trained' at 4-6 A and box 64."""
    folder = tmp_path_factory.mktemp("unet")
    export_weights(cryol_fit(folder, UNET_CONFIG), folder / "tiny-unet.pt")
    manifest = folder / "models.json"
    manifest.write_text(json.dumps({"default": "tiny-unet", "models": [CARD]}))
    return manifest


@pytest.fixture
def shipped(unet_registry, monkeypatch):
    """The test registry in place of the shipped one."""
    monkeypatch.setenv(MANIFEST_ENV, str(unet_registry))
    return unet_registry


def _stack(folder, box: int, pixel: float, n: int = 6) -> Path:
    """``n`` images of a centred Gaussian blob (SNR about 0.36 in the inscribed disk) in unit white
    noise, with ``pixel`` in the header."""
    r = (torch.arange(box) - box // 2).float()
    blob = 3 * torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * (box / 10) ** 2))
    images = blob + torch.randn(n, box, box, generator=torch.Generator().manual_seed(box))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"stack_{box}.mrcs"
    write_stack(path, images, pixel)
    return path


def _expected(stack: Path, plan, model_scale: bool = False) -> torch.Tensor:
    """What cryol denoise should write: the test model at its scale, by hand."""
    task, _ = load_pretrained("tiny-unet")
    raw = read_stack(stack).float()
    x, mean, std = plan.model_input(background_normalize(raw))
    # each image at its own background level relative to the set's median, removed again after
    raw_mean, raw_std = background_stats(raw)
    offset = raw_mean / raw_std
    if plan.downsamples:
        offset = (offset + mean) / std
    shift = offset - offset.median(dim=0, keepdim=True).values
    with torch.no_grad():
        return plan.model_output(task((x + shift)[None])[0] - shift, mean, std, model_scale)


@pytest.mark.parametrize("box", [32, 64, 100, 128])
@pytest.mark.parametrize("pixel", [1.0, 2.5, 5.0, 12.0])
def test_denoise_at_any_box_and_pixel_size(shipped, tmp_path, box, pixel):
    stack = _stack(tmp_path, box, pixel)
    plan = plan_scale(box, pixel, tuple(CARD["pixel_size_range"]))
    for scale, out in (([], tmp_path / "out"), (["--model-scale"], tmp_path / "model")):
        main(["denoise", "--star", str(stack), "--out", str(out), *scale])  # the default shipped model
        L, A = (plan.model_box, plan.model_pixel_size) if scale else (box, pixel)
        with mrcfile.open(out / f"{stack.stem}.mrcs") as f:
            data = torch.from_numpy(f.data.copy())
            assert data.shape == (6, L, L) and float(f.voxel_size.x) == pytest.approx(A, rel=1e-5)
        assert torch.allclose(data, _expected(stack, plan, bool(scale)), atol=1e-4)
        optics = starfile.read(out / f"{stack.stem}.star", always_dict=True)["optics"]
        assert int(optics["rlnImageSize"][0]) == L
        assert float(optics["rlnImagePixelSize"][0]) == pytest.approx(A, rel=1e-5)
        if scale:  # the model saw a pixel size in its range
            assert 4.0 * 0.99 <= A <= 6.0 * 1.01


def test_box_larger_than_the_training_box(shipped, tmp_path, capsys):
    stack = _stack(tmp_path, 128, 5.0)  # in the pixel-size range: no resampling, twice the training box
    main(["denoise", "--star", str(stack), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "box 128 at the model's pixel size (5 A) differs from the training box 64 of model tiny-unet" in err
    assert "pixel size" not in err.replace("model's pixel size", "")
    expected = _expected(stack, plan_scale(128, 5.0, tuple(CARD["pixel_size_range"])))
    assert plan_scale(128, 5.0, tuple(CARD["pixel_size_range"])).identity
    # the network on the input itself
    torch.testing.assert_close(read_stack(tmp_path / "out" / "stack_128.mrcs"), expected, rtol=0, atol=1e-6)


def test_pixel_size_outside_the_range_warns(shipped, tmp_path, capsys):
    main(["denoise", "--star", str(_stack(tmp_path, 64, 1.0)), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert ("cryol denoise: warning: pixel size 1 A is outside the range model tiny-unet was trained at (4-6 A); "
            "the model sees the particles resampled to 4 A") in err
    assert "box 16 at the model's pixel size (4 A) differs from the training box 64" in err
    main(["denoise", "--star", str(_stack(tmp_path / "5A", 64, 5.0)), "--out", str(tmp_path / "in_range")])
    warnings = [l for l in capsys.readouterr().err.splitlines() if "warning" in l and "no CTF parameters" not in l]
    assert warnings == []  # in range, the training box, SNR 0.36 in 0.05-0.5


def test_sure_blend_needs_a_guided_model(shipped, tmp_path, capsys):
    stack = _stack(tmp_path, 64, 5.0)
    with pytest.raises(SystemExit) as err:
        main(["denoise", "--star", str(stack), "--out", str(tmp_path / "out"), "--sure-blend"])
    assert err.value.code == 2
    assert "cryol denoise: error: --sure-blend: UNet has no inference setting 'sure_blend'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_model_and_no_shipped_model_give_clear_errors(shipped, tmp_path, capsys, monkeypatch):
    stack = _stack(tmp_path, 32, 5.0)
    with pytest.raises(SystemExit) as err:
        main(["denoise", "--model", "nope", "--star", str(stack), "--out", str(tmp_path / "out")])
    assert err.value.code == 2
    assert "cryol denoise: error: unknown model 'nope'; available: tiny-unet" in capsys.readouterr().err
    empty = tmp_path / "models.json"
    empty.write_text(json.dumps({"default": None, "models": []}))
    monkeypatch.setenv(MANIFEST_ENV, str(empty))
    with pytest.raises(SystemExit):
        main(["denoise", "--star", str(stack), "--out", str(tmp_path / "out")])
    assert "no default denoiser" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["denoise", "--ckpt", "missing.ckpt", "--star", str(stack), "--out", str(tmp_path / "out")])
    assert "--ckpt missing.ckpt: no such file" in capsys.readouterr().err


def test_default_model_is_the_named_one(shipped, tmp_path):
    stack = _stack(tmp_path, 64, 2.0)
    main(["denoise", "--star", str(stack), "--out", str(tmp_path / "a")])
    main(["denoise", "--model", "tiny-unet", "--star", str(stack), "--out", str(tmp_path / "b")])
    # the images, not the file bytes: the MRC label holds the time of writing, to the second
    assert torch.equal(read_stack(tmp_path / "a" / "stack_64.mrcs"), read_stack(tmp_path / "b" / "stack_64.mrcs"))


def test_fixed_box_model_sees_its_field_of_view(checkpoint, tmp_path, capsys):
    # the set transformer (L = 24) was trained at 8 A (recorded in its checkpoint): 64 px at 4 A would be
    # 10.7 A at its box, so it sees the central 48 px (192 A) resampled to 8 A; outside them the output is 0
    stack = _stack(tmp_path, 64, 4.0)
    main(["denoise", "--ckpt", str(checkpoint), "--star", str(stack), "--out", str(tmp_path / "out"),
          "--set-size", "3"])
    assert "cropped to the 192 A it sees" in capsys.readouterr().err
    out = read_stack(tmp_path / "out" / "stack_64.mrcs")
    assert out.shape == (6, 64, 64) and bool(torch.isfinite(out).all())
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[8:56, 8:56] = True
    assert float(out[:, ~inside].abs().max()) == 0 and float(out[:, inside].abs().max()) > 0
    small = _stack(tmp_path, 20, 4.0)  # 80 A: zero-padded to 192 A
    main(["denoise", "--ckpt", str(checkpoint), "--star", str(small), "--out", str(tmp_path / "small"),
          "--set-size", "3"])
    assert read_stack(tmp_path / "small" / "stack_20.mrcs").shape == (6, 20, 20)


def test_reconstruct_and_evaluate_load_the_same_denoisers(shipped, checkpoint, tmp_path):
    sim = tmp_path / "sim"
    main(["simulate", "--volume", "random", "--n-images", "40", "--box", "32", "--pixel-size", "6.0",
          "--snr", "1", "--no-ctf", "--out", str(sim), "--seed", "1"])
    # the set transformer has box 24: no longer refused at --box 32
    for denoiser in (str(checkpoint), "tiny-unet"):
        out = tmp_path / f"rec_{len(denoiser)}" / "map.mrc"
        main(["reconstruct", "--star", str(sim / "particles.star"), "--out", str(out), "--box", "32",
              "--denoiser", denoiser, "--set-size", "8", "--n-angles", "72", "--iterations", "3"])
        with mrcfile.open(out) as f:
            assert f.data.shape == (32, 32, 32) and np.isfinite(f.data).all()
    main(["evaluate", "--particles", str(sim / "particles.star"), "--denoiser", "tiny-unet", "--no-frc",
          "--out", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["particles"]["denoised"] == "tiny-unet (denoised by cryol evaluate)"
    assert metrics["particles"]["n_images"] == 40 and metrics["particles"]["box"] == 32


@pytest.mark.parametrize("box,pixel", [(32, 12.0), (100, 1.0), (128, 2.0)])
def test_the_default_shipped_model_at_any_box_and_pixel_size(tmp_path, monkeypatch, box, pixel):
    """As on a fresh clone: the real registry, no --model or --ckpt, boxes 32-128 and pixel sizes
    1-12 A (the 64-pixel case is in tests/tasks/test_pretrained.py); the output is at the input's
    box and pixel size, finite, and the STAR says so."""
    monkeypatch.delenv(MANIFEST_ENV, raising=False)
    stack = _stack(tmp_path, box, pixel, n=4)
    main(["denoise", "--star", str(stack), "--out", str(tmp_path / "out")])
    with mrcfile.open(tmp_path / "out" / f"{stack.stem}.mrcs") as f:
        data = torch.from_numpy(f.data.copy())
        assert data.shape == (4, box, box) and float(f.voxel_size.x) == pytest.approx(pixel, rel=1e-5)
    assert bool(torch.isfinite(data).all()) and float(data.abs().max()) > 0
    optics = starfile.read(tmp_path / "out" / f"{stack.stem}.star", always_dict=True)["optics"]
    assert int(optics["rlnImageSize"][0]) == box
    assert float(optics["rlnImagePixelSize"][0]) == pytest.approx(pixel, rel=1e-5)


@pytest.mark.parametrize("command,option,value", [("denoise", "--batch-sets", "0"), ("denoise", "--set-size", "-3"),
                                                  ("reconstruct", "--max-images", "0"), ("evaluate", "--box", "0"),
                                                  ("preprocess", "--batch-size", "0")])
def test_counts_are_checked_when_parsed(tmp_path, capsys, command, option, value):
    """Counts that used to loop forever (--batch-sets 0), raise a traceback (--set-size -3) or
    silently mean 'all' (--max-images 0) are refused at parse time, before anything is read."""
    with pytest.raises(SystemExit) as err:
        main([command, "--star" if command != "evaluate" else "--particles", str(tmp_path / "none.star"),
              "--out", str(tmp_path / "out"), option, value])
    assert err.value.code == 2
    text = capsys.readouterr().err
    assert option.lstrip("-").replace("-", "_") in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()


def test_a_nan_image_is_left_out_of_denoise_or_refused_with_strict(shipped, tmp_path, capsys):
    """A non-finite input image used to spoil its whole set with exit 0. Now it is found when the
    stack is read: left out (warning naming the stack, not a temporary STAR, and the row), the
    others denoised as finite images; --strict refuses the file and publishes nothing."""
    images = read_stack(_stack(tmp_path, 64, 5.0)).clone()
    images[2, 10, 10] = float("nan")
    stack = tmp_path / "nan.mrcs"
    with mrcfile.new(stack) as m:  # write_stack itself refuses NaN
        m.set_data(images.numpy())
        m.set_image_stack()
        m.voxel_size = 5.0
    before = _digest([stack])
    with pytest.raises(SystemExit) as err:
        main(["denoise", "--star", str(stack), "--out", str(tmp_path / "strict"), "--strict"])
    assert err.value.code == 2
    text = capsys.readouterr().err
    assert f"{stack}: 1 of 6 particle images hold NaN or Inf" in text and "data rows 3" in text
    assert "Traceback" not in text and not (tmp_path / "strict").exists()

    main(["denoise", "--star", str(stack), "--out", str(tmp_path / "out")])
    text = capsys.readouterr().err
    assert f"{stack}: 1 of 6 particle images hold NaN or Inf pixels (data rows 3)" in text and ".star" not in text
    out = read_stack(tmp_path / "out" / "nan.mrcs")
    assert out.shape[0] == 5 and torch.isfinite(out).all()
    names = starfile.read(tmp_path / "out" / "nan.star")["particles"]["rlnImageName"]
    assert len(names) == 5 and _digest([stack]) == before
