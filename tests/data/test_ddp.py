"""DDP over both datamodules: two CPU processes (gloo) see every sample exactly once per epoch,
and their loss equals a single process's at the same global batch."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from cryo_lightning.data.synthetic import SetRecipeStream
from cryo_lightning.io.star import image_names, optics_block, write_particles_star

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("_ddp_probe", HERE / "_ddp_probe.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def test_ddp_step_covers_the_single_process_batch_of_the_same_step():
    # The stream alone (no processes): rank r's k-th batch of b sets, over all ranks, is batch k
    # of one process with batch size W * b, for every worker count.
    b, world, n_sets = 3, 2, 30

    def batches(rank: int, world_size: int, block: int, workers: int) -> list[list[int]]:
        stream = SetRecipeStream("train", n_sets, 5, seed=1, vary_per_epoch=False, block=block)
        stream.rank, stream.world_size = rank, world_size
        loader = torch.utils.data.DataLoader(stream, batch_size=block, num_workers=workers)
        return [batch["seed"].tolist() for batch in loader]

    single = batches(0, 1, b * world, 0)
    for workers in (0, 2):
        ranks = [batches(r, world, b, workers) for r in range(world)]
        assert len(ranks[0]) == len(ranks[1]) == len(single)
        for k, reference in enumerate(single):
            assert sorted(ranks[0][k] + ranks[1][k]) == sorted(reference)


def test_ranks_get_equal_disjoint_shares_when_sets_do_not_divide():
    seen = []
    for rank in range(3):
        stream = SetRecipeStream("train", 17, 5, seed=1, vary_per_epoch=False, block=2)
        stream.rank, stream.world_size = rank, 3
        seen.append([int(r["seed"]) for r in stream])
    assert [len(s) for s in seen] == [5, 5, 5]  # 17 // 3: the remainder (2 sets) is skipped
    assert len(set().union(*seen)) == 15


def _star(folder: Path, n: int = 32, L: int = 16) -> Path:
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((n, L, L)) + np.arange(n)[:, None, None]).astype(np.float32)
    with mrcfile.new(folder / "stack.mrcs", data=data) as f:
        f.set_image_stack()
    particles = pd.DataFrame({"rlnImageName": image_names("stack.mrcs", n), "rlnOpticsGroup": 1,
                              "rlnDefocusU": 15000.0, "rlnDefocusV": 14000.0, "rlnDefocusAngle": 30.0})
    path = folder / "particles.star"
    write_particles_star(path, optics_block(2.0, L, 300, 2.7, 0.1), particles)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both datamodules with 2 DDP ranks of batch 2 (one pair of processes) and in this
    process with batch 4."""
    folder = tmp_path_factory.mktemp("ddp")
    star = _star(folder)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), NODE_RANK="0",
               OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, str(HERE / "_ddp_probe.py"), str(folder / "ddp"), str(star)],
                              env=dict(env, LOCAL_RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode() for p in ranks]
    assert all(p.returncode == 0 for p in ranks), outputs
    probe.fit(probe.synthetic(batch_size=4), folder / "single" / "synthetic", devices=1)
    particles = probe.as_if_distributed(probe.particles(str(star), batch_size=4))
    probe.fit(particles, folder / "single" / "particles", devices=1)

    def load(run: str, kind: str) -> list[list[dict]]:
        return [json.loads(p.read_text()) for p in sorted((folder / run / kind).glob("rank*.json"))]

    return {kind: (load("ddp", kind), load("single", kind)[0]) for kind in ("synthetic", "particles")}


@pytest.mark.parametrize("kind", ["synthetic", "particles"])
def test_each_sample_seen_exactly_once_per_epoch(runs, kind):
    ddp, single = runs[kind]
    assert len(ddp) == 2 and len(ddp[0]) == len(ddp[1]) > 1  # equal batch counts: DDP cannot hang
    seen = [i for rank in ddp for record in rank for i in record["ids"]]
    assert len(seen) == len(set(seen))
    if kind == "synthetic":
        stream = SetRecipeStream("train", probe.SETS_PER_EPOCH, 4, seed=3, vary_per_epoch=True)
        expected = {stream.recipe(0, i)["seed"] for i in range(probe.SETS_PER_EPOCH)}
    else:
        expected = {i for record in single for i in record["ids"]}  # the first particle of each of the 8 sets
        assert len(expected) == 8
    assert set(seen) == expected


@pytest.mark.parametrize("kind", ["synthetic", "particles"])
def test_loss_matches_single_process_at_the_same_global_batch(runs, kind):
    ddp, single = runs[kind]
    assert len(single) == len(ddp[0])
    for step, reference in enumerate(single):
        parts = [rank[step] for rank in ddp]
        assert sorted(parts[0]["ids"] + parts[1]["ids"]) == sorted(reference["ids"])
        # equal per-rank batches: the global loss is the mean of the ranks' losses
        np.testing.assert_allclose((parts[0]["loss"] + parts[1]["loss"]) / 2, reference["loss"], rtol=1e-5)
    assert single[-1]["loss"] != single[0]["loss"]  # the model did train, so the gradients agreed too
