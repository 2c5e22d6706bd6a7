"""Pieces shared by the model-free ``cryol`` tools: parser, device choice, ``--assume`` values."""

from __future__ import annotations

import torch

__all__ = ["tool_parser", "pick_device", "parse_assume"]


def tool_parser(prog: str, doc: str | None, particles: bool = True):
    """A jsonargparse parser with ``--config`` and, for tools that read particles, the shared
    ``--datadir``, ``--pixel-size``, ``--assume``, ``--device`` and ``--overwrite`` options."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    text = (doc or "").strip()
    parser = ArgumentParser(prog=prog, description=text.split("\n\n")[0],
                            epilog="\n\n".join(text.split("\n\n")[1:2]) or None)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options")
    if particles:
        parser.add_argument("--datadir", type=str | None, default=None,
                            help="folder holding the stacks, when the metadata's paths do not resolve")
        parser.add_argument("--pixel-size", type=float | None, default=None,
                            help="pixel size (Angstrom) for files without one")
        parser.add_argument("--assume", type=list[str], default=[],
                            help="values for missing CTF columns, e.g. --assume amplitude_contrast=0.1")
        parser.add_argument("--device", type=str, default="auto", help="'auto', 'cpu' or 'cuda'")
        parser.add_argument("--overwrite", type=bool, default=False, help="replace existing outputs (never inputs)")
    return parser


def pick_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def parse_assume(items: list[str] | None) -> dict[str, float]:
    """``["amplitude_contrast=0.1", "voltage=300"]`` -> ``{"amplitude_contrast": 0.1, ...}``."""
    values = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            values[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--assume expects NAME=VALUE (e.g. amplitude_contrast=0.1), got {item!r}") from None
    return values
