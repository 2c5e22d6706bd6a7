"""Atomic file writing: write to a temporary file beside the target, then rename it into place.

A reader never sees a half-written output, and an interrupted or failed write leaves neither
the target nor a temporary file behind. Existing files are only replaced when the caller
explicitly allows it, because the project never overwrites inputs by accident.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "check_overwrite"]


def check_overwrite(final_path: str | os.PathLike, overwrite: bool) -> None:
    """Raise ``FileExistsError`` if ``final_path`` exists and ``overwrite`` is False.

    Args:
        final_path: the output file.
        overwrite: whether replacing an existing file is allowed.
    """
    path = Path(final_path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists; refusing to overwrite it "
            "(pass --overwrite / overwrite=True to replace it)"
        )


@contextmanager
def atomic_path(final_path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; move it onto ``final_path`` on success.

    The temporary path does not exist yet when yielded: the caller creates it (so the new file
    gets the usual permissions from the umask). On normal exit it is renamed onto
    ``final_path`` with ``os.replace`` (atomic on POSIX within one file system); on any
    exception it is deleted and the exception propagates.

    Args:
        final_path: the output file.
        overwrite: allow replacing an existing ``final_path``. Checked both before the write
            starts (to fail fast) and just before the rename.

    Raises:
        FileExistsError: ``final_path`` exists and ``overwrite`` is False.
        FileNotFoundError: the output folder does not exist.
        PermissionError: the output folder is not writable.
    """
    final = Path(final_path)
    check_overwrite(final, overwrite)
    folder = final.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {final}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):  # named here, not hidden behind the writer's failure
        raise PermissionError(errno.EACCES, "permission denied: cannot write in this folder", str(folder))
    # A hidden, random name in the same folder: same file system (so the rename is atomic)
    # and no clash with concurrent writers of the same target.
    tmp = folder / f".{final.name}.{secrets.token_hex(6)}.tmp"
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"writer for {final} did not create its temporary file {tmp}")
        check_overwrite(final, overwrite)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
