"""Finding the image stacks that a STAR or cryoSPARC file refers to.

Stack paths in RELION files are relative to the RELION *project directory* (where RELION
runs), not to the STAR file, while files written by other tools are often relative to the
STAR file or to a data folder; cryoSPARC paths are relative to its project directory, and
absolute (even Windows) paths occur. :func:`resolve_stacks` tries the likely places in a
fixed order and reports every missing stack in one message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from cryo_lightning.io.errors import InputError, listed, path_problem

__all__ = ["find_project_root", "resolve_stacks"]

# A folder holding one of these is a RELION project directory.
PROJECT_FILES = ("default_pipeline.star",)
JOB_FOLDERS = (
    "Import", "MotionCorr", "CtfFind", "ManualPick", "AutoPick", "Extract", "Select",
    "Class2D", "Class3D", "InitialModel", "Refine3D", "MultiBody", "Polish", "CtfRefine",
    "PostProcess", "MaskCreate", "JoinStar", "Subtract", "External",
)
# How far above the metadata file to look when no project directory is found.
MAX_PARENT_LEVELS = 8

_WINDOWS_ABSOLUTE = re.compile(r"^([A-Za-z]:[\\/]|\\\\)")


def _is_project_root(folder: Path) -> bool:
    return any((folder / f).is_file() for f in PROJECT_FILES) or any(
        (folder / d).is_dir() for d in JOB_FOLDERS
    )


def find_project_root(metadata_path: str | os.PathLike) -> Path | None:
    """The RELION project directory holding a metadata file, if any.

    Args:
        metadata_path: a STAR/.cs file (need not exist).
    Returns:
        The first of the file's folder and its ancestors (at most ``MAX_PARENT_LEVELS``
        up) that holds ``default_pipeline.star`` or a RELION job folder such as
        ``Extract/``, or None.
    """
    folder = Path(os.path.abspath(metadata_path)).parent
    for candidate in [folder, *folder.parents][: MAX_PARENT_LEVELS + 1]:
        if _is_project_root(candidate):
            return candidate
    return None


def _parent_folders(metadata_dir: Path) -> list[Path]:
    """Ancestors of the metadata folder, up to the project root or MAX_PARENT_LEVELS."""
    if _is_project_root(metadata_dir):
        return []
    parents = []
    for parent in list(metadata_dir.parents)[:MAX_PARENT_LEVELS]:
        parents.append(parent)
        if _is_project_root(parent):
            break
    return parents


def _basename(name: str) -> str:
    # Names written on Windows use backslashes, which POSIX paths do not split on.
    return re.split(r"[\\/]", name)[-1]


def _candidates(
    name: str, datadir: Path | None, metadata_dir: Path, parents: list[Path], cwd: Path
) -> list[Path]:
    """Paths to try for one stack name, in the documented order, without duplicates."""
    out: list[Path] = []
    absolute = Path(name).is_absolute()
    relative = not absolute and not _WINDOWS_ABSOLUTE.match(name)
    rel = name.replace("\\", "/") if os.sep == "/" else name
    if absolute:
        out.append(Path(name))
    if relative:
        if datadir is not None:
            out.append(datadir / rel)
        out.append(metadata_dir / rel)
        out += [p / rel for p in parents]
    base = _basename(name)
    if datadir is not None:
        out.append(datadir / base)
    out.append(metadata_dir / base)
    if relative:
        out.append(cwd / rel)
    seen: set[str] = set()
    unique = []
    for p in out:
        key = os.path.normpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def resolve_stacks(
    stack_names: Iterable[str],
    metadata_path: str | os.PathLike,
    datadir: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Find the file of every stack named in a metadata file.

    Each unique name (as written in the metadata, without ``N@``, ``>`` or ``:mrcs``) is
    looked for in this order, and the first existing file wins:

    1. the name itself, if it is an absolute path;
    2. ``datadir / name``;
    3. the metadata file's folder ``/ name``;
    4. each parent folder of the metadata file ``/ name``, from the nearest up to and
       including the RELION project directory (the first folder holding
       ``default_pipeline.star`` or a job folder such as ``Extract/``; at most
       ``MAX_PARENT_LEVELS`` = 8 levels when there is none);
    5. the file name alone (the name's last component): ``datadir / basename``, then the
       metadata folder ``/ basename``;
    6. the name relative to the current directory (RELION runs in its project directory).

    Rules 2-4 and 6 are skipped for absolute names, including Windows paths such as
    ``F:/data/x.mrcs``, which only rule 5 can match after the data were moved.
    Symbolic links are followed: the returned paths are fully resolved.

    Args:
        stack_names: stack names, repeats allowed (e.g. the table's ``stack_name`` column).
        metadata_path: the STAR/.cs file the names come from.
        datadir: the user's ``--datadir``, or None.
    Returns:
        ``{name: resolved path}`` for every unique name.
    Raises:
        InputError: one message for all missing stacks: how many of how many, the first
            ten names, the places tried, and the fix.
    """
    metadata_dir = Path(os.path.abspath(metadata_path)).parent
    data = Path(os.path.abspath(datadir)) if datadir is not None else None
    parents = _parent_folders(metadata_dir)
    cwd = Path.cwd()
    names = list(dict.fromkeys(stack_names))
    found: dict[str, Path] = {}
    missing: dict[str, list[Path]] = {}
    unusable: list[str] = []
    for name in names:
        tried = _candidates(name, data, metadata_dir, parents, cwd)
        hit = next((p for p in tried if os.path.isfile(p)), None)
        if hit is None:
            missing[name] = tried
            problem = next(((p, path_problem(p)) for p in tried if path_problem(p)), None)
            if problem:
                unusable.append(f"{name}: {problem[0]} {problem[1]}")
        else:
            found[name] = Path(hit).resolve()
    if unusable:
        raise InputError("\n".join([f"{len(unusable)} of {len(names)} image stacks referenced by {metadata_path} "
                                     "exist but cannot be read as stacks:", *listed(unusable)]))
    if missing:
        raise InputError(
            _missing_message(missing, len(names), metadata_path, data, metadata_dir, parents, cwd)
        )
    return found


def _describe_parents(metadata_dir: Path, parents: list[Path]) -> str:
    if not parents:
        return "the metadata file's folder is the project directory"
    listed = ", ".join(map(str, parents))
    if _is_project_root(parents[-1]):
        return listed
    return f"no project directory found; tried {listed}"


def _missing_message(
    missing: dict[str, list[Path]],
    total: int,
    metadata_path: str | os.PathLike,
    datadir: Path | None,
    metadata_dir: Path,
    parents: list[Path],
    cwd: Path,
) -> str:
    lines = [
        f"{len(missing)} of {total} image stacks referenced by {metadata_path} were not found:"
    ]
    lines += listed(list(missing))
    given = str(datadir) if datadir is not None else "not given"
    lines += [
        "Each name was looked for, in this order:",
        "  1. as written, if it is an absolute path",
        f"  2. under --datadir ({given})",
        f"  3. under the metadata file's folder ({metadata_dir})",
        "  4. under its parent folders up to the RELION project directory ("
        + _describe_parents(metadata_dir, parents)
        + ")",
        "  5. by file name alone, under --datadir and the metadata file's folder",
        f"  6. under the current directory ({cwd})",
    ]
    first, tried = next(iter(missing.items()))
    lines.append(f"For example, {first!r} was looked for at:")
    lines += [f"    {p}" for p in tried]
    lines.append(
        "Fix: pass --datadir DIR pointing at the folder that holds them (for RELION "
        "files, the project directory), or run from the RELION project directory."
    )
    return "\n".join(lines)
