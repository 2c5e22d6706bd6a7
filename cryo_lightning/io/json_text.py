"""JSON that every reader accepts: no bare ``NaN`` or ``Infinity`` (Python's ``json`` writes them
by default, and they are not JSON)."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["json_safe", "json_text"]


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (at any depth of dicts, lists and tuples) replaced by
    None, which JSON writes as ``null`` (a resolution of ``inf``: no correlation at all; a ratio of
    NaN: nothing to compare)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_text(obj: Any, indent: int | None = 1) -> str:
    """``json.dumps`` of :func:`json_safe` ``(obj)``, refusing anything else that is not JSON."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)
