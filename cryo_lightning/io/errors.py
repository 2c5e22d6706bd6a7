"""User-input errors: one clear message naming the file, the row or column, and the fix."""

import errno
import os

MAX_LISTED = 10  # items listed in a message about many files or rows


def listed(items: list[str], limit: int = MAX_LISTED) -> list[str]:
    """Message lines ``  - item`` for the first ``limit`` items, then ``  ... and N more``."""
    lines = [f"  - {item}" for item in list(items)[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return lines



class InputError(ValueError):
    """Bad user input (missing column or stack, size mismatch, ...). The CLI prints the message
    without a traceback (full traceback with --debug)."""


def path_problem(path: str | os.PathLike) -> str | None:
    """Why an existing name cannot be read as a file, in words ("is a folder", "is a symbolic link
    loop", ...), or None when it is a readable file or does not exist at all (then "not found")."""
    if os.path.isfile(path):
        return None if os.access(path, os.R_OK) else "cannot be read: permission denied"
    if os.path.isdir(path):
        return "is a folder, not a file"
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                return "is a symbolic link loop"
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
    if os.path.lexists(path):
        return "is not a regular file"
    return None
