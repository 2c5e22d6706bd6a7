"""JSON outputs: no bare NaN or Infinity."""

from __future__ import annotations

import json
import math

from cryo_lightning.io.json_text import json_safe, json_text


def test_non_finite_numbers_become_null_at_any_depth():
    obj = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf, "d": (2, math.nan)}], "e": "NaN", "f": 3}
    assert json_safe(obj) == {"a": None, "b": [1.0, None, {"c": None, "d": [2, None]}], "e": "NaN", "f": 3}
    text = json_text(obj)
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text
    assert json.loads(text)["b"][1] is None
