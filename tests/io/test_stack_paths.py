from __future__ import annotations

import os
from pathlib import Path

import pytest
import starfile

from cryo_lightning.io.errors import InputError
from cryo_lightning.io.stack_paths import find_project_root, resolve_stacks


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def _stack_names(star: Path) -> list[str]:
    """Stack names of a STAR's particles (N@ removed), read independently with starfile."""
    data = starfile.read(star, always_dict=True)
    table = data.get("particles", next(iter(data.values())))
    return [name.split("@", 1)[1] for name in table["rlnImageName"]]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A RELION-like project: the STAR in Select/job020 refers to Extract/job012 stacks."""
    root = tmp_path / "project"
    _touch(root / "default_pipeline.star")
    _touch(root / "Extract/job012/Movies/a.mrcs")
    _touch(root / "Select/job020/particles.star")
    return root


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch) -> Path:
    """An empty current directory, so rule 6 (cwd) finds nothing by accident."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_relion_project_paths_resolve_through_parent_folders(project, elsewhere):
    star = project / "Select/job020/particles.star"
    name = "Extract/job012/Movies/a.mrcs"
    got = resolve_stacks([name, name], star)
    assert got == {name: (project / name).resolve()}
    assert find_project_root(star) == project


def test_parent_search_stops_at_the_project_root(tmp_path, elsewhere):
    # The stack sits above the project directory: a parent beyond the root must not match.
    root = tmp_path / "outer/project"
    _touch(root / "default_pipeline.star")
    _touch(tmp_path / "outer/x.mrcs")
    star = _touch(root / "Select/job1/particles.star")
    with pytest.raises(InputError, match="1 of 1 image stacks"):
        resolve_stacks(["x.mrcs"], star)


def test_datadir_rule_comes_before_the_metadata_folder(tmp_path, elsewhere):
    star = _touch(tmp_path / "meta/particles.star")
    in_meta = _touch(tmp_path / "meta/stacks/s.mrcs")
    in_data = _touch(tmp_path / "data/stacks/s.mrcs")
    assert resolve_stacks(["stacks/s.mrcs"], star) == {"stacks/s.mrcs": in_meta.resolve()}
    got = resolve_stacks(["stacks/s.mrcs"], star, datadir=tmp_path / "data")
    assert got == {"stacks/s.mrcs": in_data.resolve()}


def test_basename_rule_finds_moved_stacks(tmp_path, elsewhere):
    star = _touch(tmp_path / "meta/particles.star")
    moved = _touch(tmp_path / "data/0003_shiny.mrcs")
    beside = _touch(tmp_path / "meta/b.mrcs")
    names = ["Polish/job520/Micrographs/0003_shiny.mrcs", "F:/WM5984/tomo/b.mrcs"]
    got = resolve_stacks(names, star, datadir=tmp_path / "data")
    assert got == {names[0]: moved.resolve(), names[1]: beside.resolve()}


def test_absolute_path_and_symlinks_are_followed(tmp_path, elsewhere):
    target = _touch(tmp_path / "real/s.mrcs")
    link = tmp_path / "links/s.mrcs"
    link.parent.mkdir()
    link.symlink_to(target)
    star = _touch(tmp_path / "meta/particles.star")
    assert resolve_stacks([str(link)], star) == {str(link): target.resolve()}


def test_current_directory_is_the_last_resort(project, monkeypatch):
    star = _touch(project.parent / "exported/particles.star")
    monkeypatch.chdir(project)
    name = "Extract/job012/Movies/a.mrcs"
    assert resolve_stacks([name], star) == {name: (project / name).resolve()}


def test_all_missing_stacks_are_reported_at_once(tmp_path, elsewhere):
    star = _touch(tmp_path / "meta/particles.star")
    _touch(tmp_path / "meta/ok.mrcs")
    names = ["ok.mrcs", "Extract/job1/m1.mrcs", "Extract/job1/m2.mrcs", "m3.mrcs"]
    with pytest.raises(InputError) as err:
        resolve_stacks(names, star, datadir=tmp_path / "nowhere")
    msg = str(err.value)
    assert "3 of 4 image stacks" in msg and str(star) in msg
    assert all(n in msg for n in names[1:]) and "- ok.mrcs" not in msg
    assert "--datadir" in msg and "project directory" in msg
    # The concrete places tried for the first missing name are listed.
    assert str(tmp_path / "nowhere/Extract/job1/m1.mrcs") in msg
    assert str(tmp_path / "meta/m1.mrcs") in msg


def test_many_missing_stacks_list_only_the_first_ten(tmp_path, elsewhere):
    star = _touch(tmp_path / "particles.star")
    names = [f"s{k:03d}.mrcs" for k in range(25)]
    with pytest.raises(InputError) as err:
        resolve_stacks(names, star)
    msg = str(err.value)
    assert "25 of 25" in msg and "s009.mrcs" in msg and "s010.mrcs" not in msg
    assert "and 15 more" in msg


def test_relion5_fixture_resolves_with_datadir(shared_data, elsewhere):
    folder = shared_data / "real/cryodrgn"
    star = folder / "relion5.star"
    names = _stack_names(star)
    assert set(names) == {"toy_images_a.mrcs", "toy_images_b.mrcs"}
    with pytest.raises(InputError, match="2 of 2"):
        resolve_stacks(names, star)
    got = resolve_stacks(names, star, datadir=folder / "toy_datadir")
    assert got == {n: (folder / "toy_datadir" / n).resolve() for n in set(names)}


def test_cryojax_fixture_names_its_missing_stack(shared_data, elsewhere):
    star = shared_data / "real/cryojax/trpv1_small_stack.star"
    names = _stack_names(star)
    assert set(names) == {"./batch_0_restacked.mrc"}
    with pytest.raises(InputError) as err:
        resolve_stacks(names, star)
    msg = str(err.value)
    assert "1 of 1" in msg and "./batch_0_restacked.mrc" in msg and "--datadir" in msg
    assert os.path.join(str(star.parent), "batch_0_restacked.mrc") in msg
