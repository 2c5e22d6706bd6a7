"""Pieces shared by the model-free ``cryol`` tools: parser, device choice, ``--assume`` values."""

from __future__ import annotations

from pathlib import Path

import torch

from cryo_lightning.io.atomic_write import check_overwrite
from cryo_lightning.io.errors import InputError

__all__ = ["tool_parser", "add_flag", "pick_device", "parse_assume", "prepare_outputs"]


def tool_parser(prog: str, doc: str | None, particles: bool = True):
    """A jsonargparse parser with ``--config`` and, for tools that read particles, the shared
    ``--datadir``, ``--pixel-size``, ``--assume``, ``--device`` and ``--overwrite`` options."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    text = (doc or "").strip()
    paragraphs = text.split("\n\n")
    parser = ArgumentParser(prog=prog, description=paragraphs[0],
                            epilog="\n\n".join(paragraphs[1:3]) or None)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options")
    if particles:
        parser.add_argument("--datadir", type=str | None, default=None,
                            help="folder holding the stacks, when the metadata's paths do not resolve")
        parser.add_argument("--pixel-size", type=float | None, default=None,
                            help="pixel size (Angstrom) for files without one")
        parser.add_argument("--assume", type=str | None, default=None,
                            help="values for missing CTF columns, e.g. --assume amplitude_contrast=0.1 "
                                 "or --assume voltage=300,cs=2.7")
        parser.add_argument("--device", type=str, default="auto", help="'auto', 'cpu' or 'cuda'")
        add_flag(parser, "--overwrite", False, "replace existing outputs (never inputs)")
    return parser


def add_flag(parser, name: str, default: bool, help: str) -> None:
    """A boolean option given as ``--name`` / ``--no-name``."""
    from jsonargparse import ActionYesNo

    parser.add_argument(name, action=ActionYesNo(no_prefix="no-"), default=default, help=help)


def pick_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def parse_assume(text: str | None) -> dict[str, float]:
    """``"amplitude_contrast=0.1,voltage=300"`` -> ``{"amplitude_contrast": 0.1, "voltage": 300.0}``."""
    values = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            values[key.strip()] = float(value)
        except ValueError:
            raise InputError(f"--assume expects NAME=VALUE[,NAME=VALUE...] (e.g. amplitude_contrast=0.1), "
                             f"got {item!r}") from None
    return values


def prepare_outputs(outputs: list[Path], inputs: list[Path], overwrite: bool) -> None:
    """Refuse outputs that are inputs or exist (unless ``overwrite``), then create their folders."""
    resolved = {Path(p).resolve() for p in inputs}
    for path in outputs:
        if Path(path).resolve() in resolved:
            raise InputError(f"{path} is an input file; inputs are never overwritten: choose another --out or --stem")
        check_overwrite(path, overwrite)
    for path in outputs:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
