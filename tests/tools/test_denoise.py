"""`cryol denoise` on real stacks: valid STAR/MRCS outputs, inputs untouched, context sets."""

from __future__ import annotations

import hashlib
import os
import shutil

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryo_lightning.cli import main
from cryo_lightning.io.mrc import read_stack
from cryo_lightning.tools.denoise import context_sets, rotation_invariant_embedding


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


def _fit(folder, config: str):
    """`cryol fit` on ``config`` run inside ``folder``; returns its last checkpoint."""
    (folder / "tiny.yaml").write_text(config)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        main(["fit", "--config", "tiny.yaml"])
    finally:
        os.chdir(cwd)
    return folder / "ckpt" / "last.ckpt"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint written by `cryol fit`, as users get them."""
    return _fit(tmp_path_factory.mktemp("ckpt"), CONFIG)


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
    out = tmp_path / "out"
    main(["denoise", "--ckpt", str(checkpoint), "--star", str(folder / name), "--out", str(out),
          "--set-size", "3", "--context", "neighbours", *extra])
    assert _digest(copies) == before
    stem = name.rsplit(".", 1)[0]
    with mrcfile.open(out / f"{stem}.mrcs") as f:
        n = f.data.shape[0]
        assert f.data.shape[1:] == (24, 24) and np.isfinite(f.data).all()
    blocks = starfile.read(out / f"{stem}.star", always_dict=True)
    assert list(blocks) == ["optics", "particles"] and len(blocks["particles"]) == n
    assert int(blocks["optics"]["rlnImageSize"][0]) == 24


def test_context_sets_partition_and_group_similar_images():
    sets = context_sets(10, 4, "random", seed=1)
    assert sorted(np.concatenate(sets).tolist()) == list(range(10)) and [len(s) for s in sets] == [4, 4, 2]
    # two clusters of rotated copies: neighbour sets never mix them
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 24, 24, generator=g)
    images = torch.stack([torch.rot90(a, k % 4) if k < 8 else torch.rot90(b, k % 4) for k in range(16)])
    images = images + 0.05 * torch.randn(16, 24, 24, generator=g)
    emb = rotation_invariant_embedding(images)
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


def test_denoise_uses_the_denoiser_of_a_joint_checkpoint(shared_data, tmp_path):
    # The main job's checkpoint (JointTask) denoises particles like a DenoiseTask's
    ckpt = _fit(tmp_path, JOINT_CONFIG)
    stack = shared_data / "real" / "cryodrgn" / "hand.5.mrcs"
    out = tmp_path / "out"
    main(["denoise", "--ckpt", str(ckpt), "--star", str(stack), "--out", str(out),
          "--set-size", "3", "--pixel-size", "4.0"])
    with mrcfile.open(out / "hand.5.mrcs") as f:
        assert f.data.shape == tuple(read_stack(stack).shape) and np.isfinite(f.data).all()
