"""Publish a command's output files together: staged in a hidden folder, then moved into place.

A command such as ``cryol denoise`` writes a stack and the STAR that describes it;
``cryol reconstruct`` writes a map, two half maps, a STAR, a plot and a JSON report. A user (or a
pipeline) that sees one of them must be able to trust that the rest are there and belong to it.
So every file of the set is written into a hidden staging folder beside its final place, and
only when the command has finished are they renamed into place, the metadata (STAR, JSON) last.
On any failure, Ctrl-C or SIGTERM (which the CLI turns into an exception), the staging folder is
removed and nothing appears under the final names. Renames within one file system are atomic
and the publishing step holds SIGINT and SIGTERM back, so it is not interrupted half way.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from cryo_lightning.io.atomic_write import check_overwrite
from cryo_lightning.io.errors import InputError

__all__ = ["output_set", "make_output_folder"]

_LAST = (".star", ".json", ".cs")  # metadata that describes the other files: published last
_HELD = {signal.SIGINT, signal.SIGTERM}


def make_output_folder(folder: Path) -> list[Path]:
    """Create ``folder`` (and parents) for outputs; returns the folders created, deepest last.

    Raises:
        InputError: a file is in the way, or the folder cannot be created or written to.
    """
    folder = Path(folder)
    created = []
    for parent in reversed([folder, *folder.parents]):
        if parent.is_dir():
            continue
        if parent.exists() or parent.is_symlink():
            raise InputError(f"cannot create output folder {folder}: {parent} exists and is not a folder; "
                             "choose another --out")
        try:
            parent.mkdir()
        except PermissionError:
            raise InputError(f"cannot create output folder {parent}: permission denied; "
                             "choose a folder you can write to") from None
        except OSError as err:
            raise InputError(f"cannot create output folder {parent}: {err.strerror}") from None
        created.append(parent)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write in output folder {folder}: permission denied; "
                         "choose a folder you can write to")
    return created


@contextmanager
def output_set(finals: Mapping[str, str | os.PathLike], overwrite: bool = False) -> Iterator[dict[str, Path]]:
    """Yield staging paths (same keys as ``finals``); publish the files written there on success.

    Every path in ``finals`` is checked first (an existing file is refused unless ``overwrite``).
    The caller writes any subset of the yielded paths; files it did not write are simply not
    published. Files of one folder are staged in one hidden folder beside them, so a STAR that
    names its stack relative to itself stays right after publishing.

    Args:
        finals: output name -> final path.
        overwrite: allow replacing existing files (checked on entry and again before publishing).

    Raises:
        FileExistsError: an output exists and ``overwrite`` is False.
        InputError: an output folder cannot be created or written to.
    """
    finals = {key: Path(path) for key, path in finals.items()}
    for path in finals.values():
        if path.is_dir():
            raise InputError(f"output {path} is a folder; choose another --out")
        check_overwrite(path, overwrite)
    created: list[Path] = []
    staging: dict[Path, Path] = {}
    token = secrets.token_hex(4)
    try:
        for folder in dict.fromkeys(path.parent for path in finals.values()):
            created += make_output_folder(folder)
            stage = folder / f".cryol-{token}.partial"
            try:
                stage.mkdir()
            except OSError as err:
                raise InputError(f"cannot write in output folder {folder}: {err.strerror}") from None
            staging[folder] = stage
        staged = {key: staging[path.parent] / path.name for key, path in finals.items()}
        yield staged
        for path in finals.values():
            check_overwrite(path, overwrite)
        order = sorted(finals, key=lambda key: finals[key].suffix.lower() in _LAST)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
        try:
            for key in order:
                if staged[key].exists():
                    os.replace(staged[key], finals[key])
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        created = []  # published: the folders hold outputs now
    finally:
        for stage in staging.values():
            shutil.rmtree(stage, ignore_errors=True)
        for folder in reversed(created):  # folders made for a set that was not published
            try:
                folder.rmdir()
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise
