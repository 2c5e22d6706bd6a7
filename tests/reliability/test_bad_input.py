"""Issue 22, items 2-4 and 6-8: bad input gives one clear line (exit 2) or a warning, never a
traceback, a hang or a silent wrong result; inputs stay byte-identical and nothing partial remains."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryo_lightning.io.mrc import read_stack, write_map, write_stack
from cryo_lightning.tasks.model_registry import list_models
from tests.conftest import SHARED_DATA
from tests.reliability.conftest import leftovers, snapshot, strict_json


def _refused(run, *args, words: tuple[str, ...], inputs=(), out=None, code: int = 2) -> str:
    """Run a command that must fail: exit ``code``, one line without a traceback naming ``words``,
    ``inputs`` untouched, no ``out`` and no temporaries."""
    before = [snapshot(folder) for folder in inputs]
    status, err = run(*args)
    assert status == code, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    assert [snapshot(folder) for folder in inputs] == before
    if out is not None:
        assert not os.path.lexists(out), f"{out} was left behind"
        assert not leftovers(out.parent)
    return err


def _star_with(dataset, tmp_path, edit) -> "os.PathLike":
    """A copy of the dataset whose STAR blocks were changed by ``edit(blocks)``."""
    folder = tmp_path / "in"
    shutil.copytree(dataset, folder)
    blocks = starfile.read(folder / "particles.star", always_dict=True)
    edit(blocks)
    starfile.write(blocks, folder / "particles.star", overwrite=True)
    return folder


# -- item 2: CTF values ------------------------------------------------------------------------


@pytest.mark.parametrize("column,value,words", [
    ("rlnVoltage", 0.0, ("rlnVoltage is 0", "optics group 1", "at least 20 kV")),
    ("rlnAmplitudeContrast", 10.0, ("rlnAmplitudeContrast is 10", "percentage")),
])
def test_ctf_values_out_of_range_are_refused_even_with_phase_flip(cryol, dataset, tmp_path, column, value, words):
    folder = _star_with(dataset, tmp_path, lambda b: b["optics"].__setitem__(column, value))
    _refused(cryol, "preprocess", "--star", folder / "particles.star", "--out", tmp_path / "prep", "--phase-flip",
             words=(str(folder / "particles.star"), *words), inputs=[folder], out=tmp_path / "prep")


def test_defocus_in_micrometres_is_refused_with_the_likely_fix(cryol, dataset, tmp_path):
    folder = _star_with(dataset, tmp_path, lambda b: b["particles"].__setitem__("rlnDefocusU", 1.4))
    _refused(cryol, "reconstruct", "--star", folder / "particles.star", "--out", tmp_path / "o" / "m.mrc",
             words=("rlnDefocusU is 1.4", "data row 1", "did you mean micrometres"), inputs=[folder],
             out=tmp_path / "o")


# -- item 3: simulate ---------------------------------------------------------------------------


@pytest.mark.parametrize("extra,words", [
    (["--pixel-size", "-2"], ("--pixel-size must be a positive",)),
    (["--defocus-min", "30000", "--defocus-max", "10000"], ("swap them",)),
    (["--box", "4000"], ("GiB of memory", "use a smaller --box")),
])
def test_simulate_refuses_impossible_settings_before_writing(cryol, tmp_path, extra, words):
    args = {"--volume": "random", "--n-images": "10", "--box": "16", "--pixel-size": "5", "--snr": "1",
            "--out": str(tmp_path / "sim")}
    for key, value in zip(extra[::2], extra[1::2]):
        args[key] = value
    _refused(cryol, "simulate", *[x for kv in args.items() for x in kv], words=words, out=tmp_path / "sim")


# -- item 4: minor silent behaviours ----------------------------------------------------------


def test_duplicate_star_rows_are_kept_with_a_note(cryol, dataset, tmp_path):
    def repeat(blocks):
        p = blocks["particles"]
        blocks["particles"] = pd.concat([p, p.iloc[[4]]], ignore_index=True)

    folder = _star_with(dataset, tmp_path, repeat)
    code, err = cryol("preprocess", "--star", folder / "particles.star", "--out", tmp_path / "prep")
    assert code == 0
    assert "1 particle row(s) name an image that an earlier row names too (e.g. data rows 5 and 37" in err


def test_an_empty_rows_file_exports_nothing_and_says_so(cryol, dataset, tmp_path):
    rows = tmp_path / "rows.txt"
    rows.write_text("# nothing selected\n\n")
    _refused(cryol, "export", "--star", dataset / "particles.star", "--rows", rows, "--out", tmp_path / "s.star",
             words=("holds no row numbers",), inputs=[dataset], out=tmp_path / "s.star")


def test_identical_half_maps_get_a_warning_not_a_silent_fsc_of_one(cryol, tmp_path):
    volume = torch.randn(16, 16, 16, generator=torch.Generator().manual_seed(1))
    write_map(tmp_path / "h.mrc", volume, 3.0)
    code, err = cryol("evaluate", "--half-maps", tmp_path / "h.mrc", tmp_path / "h.mrc", "--out", tmp_path / "e")
    assert code == 0 and "are identical" in err
    assert "identical" in strict_json(tmp_path / "e" / "metrics.json")["half_maps"]["warning"]


@pytest.mark.parametrize("args,words", [
    (["--max-images", "0"], ("--max-images",)),
    (["--box", "48"], ("--box 48 is larger than the particles' box (32)",)),
])
def test_reconstruct_refuses_counts_and_boxes_it_cannot_honour(cryol, dataset, tmp_path, args, words):
    _refused(cryol, "reconstruct", "--star", dataset / "particles.star", "--out", tmp_path / "o" / "m.mrc", *args,
             words=words, inputs=[dataset], out=tmp_path / "o")


def test_a_plain_stack_at_the_default_header_pixel_size_gets_a_warning(cryol, dataset, tmp_path):
    stack = tmp_path / "eman.mrcs"
    write_stack(stack, read_stack(dataset / "particles.mrcs"), 1.0)
    code, err = cryol("reconstruct", "--star", stack, "--out", tmp_path / "o" / "m.mrc")
    assert code == 0 and "header's pixel size is 1.0 A" in err and "pass --pixel-size" in err
    code, err = cryol("reconstruct", "--star", stack, "--out", tmp_path / "o2" / "m.mrc", "--pixel-size", "6")
    assert code == 0 and "1.0 A" not in err


# -- item 6: numbers validated at parse time -------------------------------------------------


@pytest.mark.parametrize("args", [["--batch-sets", "0"], ["--batch-sets", "-1"], ["--set-size", "0"],
                                  ["--set-size", "-3"]])
def test_denoise_counts_are_refused_when_parsed(cryol, dataset, tmp_path, args):
    _refused(cryol, "denoise", "--star", dataset / "particles.star", "--out", tmp_path / "d", *args,
             words=(args[0],), inputs=[dataset], out=tmp_path / "d")


# -- item 7: former tracebacks ---------------------------------------------------------------


def test_an_unwritable_output_folder_is_one_line(cryol, dataset, tmp_path):
    if os.geteuid() == 0:  # root writes anywhere a mode allows: use a file system that refuses
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("running as root without /sys: no folder that root cannot write to")
        out = "/sys/kernel/cryol_test_out"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = locked / "out"
    err = _refused(cryol, "preprocess", "--star", dataset / "particles.star", "--out", out,
                   words=("cannot", str(out)), inputs=[dataset])
    assert "permission denied" in err or "not permitted" in err.lower()
    assert not os.path.exists(out)


@pytest.fixture
def bad_checkpoints(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    shipped = next(card.file for card in list_models())
    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "truncated.ckpt").write_bytes(shipped.read_bytes()[:5000])
    (folder / "garbage.ckpt").write_bytes(bytes(range(256)) * 40)
    torch.save({"weights": torch.zeros(3)}, folder / "keyless.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "cryo_lightning.tasks.reconstruct."
                                                       "ReconstructTask"}}, folder / "wrong_task.ckpt")
    checkpoint = torch.load(shipped, map_location="cpu", weights_only=True)
    key = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key] * float("nan")
    torch.save(checkpoint, folder / "nan_weights.ckpt")
    return folder


@pytest.mark.parametrize("name,words", [
    ("empty.ckpt", ("is empty (0 bytes)",)),
    ("truncated.ckpt", ("not a PyTorch checkpoint", "truncated")),
    ("garbage.ckpt", ("not a PyTorch checkpoint",)),
    ("keyless.ckpt", ("not a `cryol fit` checkpoint",)),
    ("wrong_task.ckpt", ("ReconstructTask checkpoint, not a denoiser",)),
    ("nan_weights.ckpt", ("NaN or Inf", "diverged")),
    (".", ("is a folder", ".ckpt")),
])
def test_bad_checkpoints_are_one_line(cryol, dataset, tmp_path, bad_checkpoints, name, words):
    ckpt = bad_checkpoints / name
    _refused(cryol, "denoise", "--star", dataset / "particles.star", "--ckpt", ckpt, "--out", tmp_path / "d",
             words=(f"--ckpt {ckpt}", *words), inputs=[dataset, bad_checkpoints], out=tmp_path / "d")


def test_reconstruct_with_too_few_images_is_one_line(cryol, dataset, tmp_path):
    _refused(cryol, "reconstruct", "--star", dataset / "particles.star", "--max-images", "1",
             "--out", tmp_path / "o" / "m.mrc", words=("1 usable particle image(s)", "needs at least 6"),
             inputs=[dataset], out=tmp_path / "o")


def test_fit_with_a_binary_config_is_one_line(cryol, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"model:\n\xff\xfe\x00binary")
    _refused(cryol, "fit", "--config", config, words=("is not a text (YAML) file",))


# -- item 8: clearer messages ----------------------------------------------------------------


def test_an_existing_file_as_output_folder_is_named(cryol, dataset, tmp_path):
    (tmp_path / "taken").write_text("a file")
    _refused(cryol, "preprocess", "--star", dataset / "particles.star", "--out", tmp_path / "taken",
             words=(f"{tmp_path / 'taken'} exists and is not a folder",), inputs=[dataset])
    assert (tmp_path / "taken").read_text() == "a file"


def test_symlink_loops_and_folders_are_not_reported_as_missing(cryol, dataset, tmp_path):
    loop = tmp_path / "loop.star"
    os.symlink(loop, loop)
    _refused(cryol, "preprocess", "--star", loop, "--out", tmp_path / "p", words=("symbolic link loop",))
    folder = tmp_path / "stack.mrcs"
    folder.mkdir()
    _refused(cryol, "denoise", "--star", folder, "--out", tmp_path / "d", words=("is a folder",))
    moved = _star_with(dataset, tmp_path, lambda b: None)
    os.remove(moved / "particles.mrcs")
    (moved / "particles.mrcs").mkdir()
    _refused(cryol, "preprocess", "--star", moved / "particles.star", "--out", tmp_path / "p2",
             words=("exist but cannot be read as stacks", "is a folder"))


def test_pixel_size_warning_says_the_given_value_is_used(cryol, dataset, tmp_path):
    code, err = cryol("preprocess", "--star", dataset / "particles.star", "--out", tmp_path / "p",
                      "--pixel-size", "5.0")
    assert code == 0
    assert "differs by more than 1% from --pixel-size" in err and "Using --pixel-size as given" in err
    assert "pass the pixel size explicitly" not in err


def test_export_names_lines_and_rows(cryol, dataset, tmp_path):
    rows = tmp_path / "rows.txt"
    rows.write_text("0\n1\nabc\n")
    _refused(cryol, "export", "--star", dataset / "particles.star", "--rows", rows, "--out", tmp_path / "s.star",
             words=("line 3", "'abc' is not a row number"), out=tmp_path / "s.star")
    rows.write_text("# header\n5\n99\n")
    _refused(cryol, "export", "--star", dataset / "particles.star", "--rows", rows, "--out", tmp_path / "s.star",
             words=("line 3: row 99 is out of range", "36 particles, rows 0 to 35"), out=tmp_path / "s.star")


def test_export_of_a_cs_file_names_its_half_set_field(cryol, tmp_path):
    cs = SHARED_DATA / "real" / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs"
    if not cs.is_file():
        pytest.skip(f"shared fixture {cs} not found (only present beside the project checkout)")
    data = np.load(cs)
    data["alignments3D/split"] = 0  # every particle in half-set 1
    edited = tmp_path / "all_half1.cs"
    with open(edited, "wb") as f:
        np.save(f, data)
    err = _refused(cryol, "export", "--star", edited, "--random-subset", "2", "--out", tmp_path / "s.cs",
                   words=("half-set 2", "alignments3D/split"), out=tmp_path / "s.cs")
    assert "rlnRandomSubset" not in err
