"""User-input errors: one clear message naming the file, the row or column, and the fix."""

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
