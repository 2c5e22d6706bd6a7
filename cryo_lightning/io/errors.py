"""User-input errors: one clear message naming the file, the row or column, and the fix."""


class InputError(ValueError):
    """Bad user input (missing column or stack, size mismatch, ...). The CLI prints the message
    without a traceback (full traceback with --debug)."""
