"""`cryol cache-guides` then `cryol fit` on the cached sets: the EM-guided transformer trains."""

from __future__ import annotations

import pytest
import torch


CONFIG = """
seed_everything: 0
trainer:
  max_steps: {steps}
  limit_val_batches: 1
  val_check_interval: 2
  check_val_every_n_epoch: null
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: ckpt, save_last: true}}
model:
  class_path: cryo_lightning.tasks.denoise.DenoiseTask
  init_args:
    net:
      class_path: cryo_lightning.models.rotational_transformer.RotationalSetTransformer
      init_args: {{L: 16, channels: 4, heads: 1, head_dim: 4, layers: 1, classes: 4, hidden: 4, guide: em,
                  em_iterations: 1, em_rotations: 300, em_max_shift: 1.0}}
    lr: 0.003
data:
  class_path: cryo_lightning.data.synthetic.SyntheticSetDataModule
  init_args:
    box: 16
    batch_size: 2
    n_train_molecules: 4
    n_val_molecules: 2
    val_sets: 2
    guide_cache: guides
    simulation: {{set_size: 8, snr: [0.5, 0.5], max_shift: 1.0}}
"""


def test_cache_then_fit_streams_cached_sets_and_resumes(tmp_path, cryol_in):
    (tmp_path / "em.yaml").write_text(CONFIG.format(steps=4))
    cryol_in(tmp_path, ["cache-guides", "--config", "em.yaml", "--split", "val"])
    cryol_in(tmp_path, ["cache-guides", "--config", "em.yaml", "--split", "train", "--sets", "3", "--shard", "2"])
    shards = sorted(p.name for p in (tmp_path / "guides").glob("*.pt"))
    assert shards == ["train-00000.pt", "train-00001.pt", "val-00000.pt"]
    # asking for more resumes after the last shard; asking for as many does nothing
    cryol_in(tmp_path, ["cache-guides", "--config", "em.yaml", "--split", "train", "--sets", "4", "--shard", "2"])
    assert len(torch.load(tmp_path / "guides" / "train-00002.pt")["seed"]) == 1
    cryol_in(tmp_path, ["cache-guides", "--config", "em.yaml", "--split", "train", "--sets", "4"])
    assert len(list((tmp_path / "guides").glob("train-*.pt"))) == 3
    cryol_in(tmp_path, ["fit", "--config", "em.yaml"])
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 4 and "net.em_weight" in state["state_dict"]


def test_a_network_without_an_em_guide_is_refused(tmp_path, cryol_in):
    (tmp_path / "cwf.yaml").write_text(CONFIG.format(steps=1).replace("guide: em,", "guide: cwf,"))
    with pytest.raises(SystemExit):
        cryol_in(tmp_path, ["cache-guides", "--config", "cwf.yaml", "--split", "val"])
