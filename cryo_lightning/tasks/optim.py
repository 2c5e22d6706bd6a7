"""Optimiser parameter groups with per-prefix learning rates."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["lr_groups"]


def lr_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], lr: float,
              overrides: dict[str, float] | None = None) -> list[dict]:
    """Parameters grouped by learning rate: ``overrides`` maps a name prefix to its rate (the first
    matching prefix wins), every other parameter gets ``lr``. Returns ``[{"params", "lr"}]``."""
    overrides = overrides or {}
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in named_parameters:
        rate = next((v for prefix, v in overrides.items() if name.startswith(prefix)), lr)
        groups.setdefault(rate, []).append(param)
    return [{"params": p, "lr": rate} for rate, p in groups.items()]
