"""Pieces shared by the model-free ``cryol`` tools: parser, device choice, ``--assume`` values."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch

from cryo_lightning.io.atomic_write import check_overwrite
from cryo_lightning.io.errors import InputError
from cryo_lightning.io.stack_header import read_stack_info
from cryo_lightning.io.star import image_names, write_particles_star

__all__ = ["tool_parser", "add_flag", "pick_device", "parse_assume", "prepare_outputs", "open_particle_input"]


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
                            help="pixel size (Angstrom); overrides the value in the STAR/.cs file or stack header")
        parser.add_argument("--assume", type=str | None, default=None,
                            help="values for missing CTF columns, e.g. --assume amplitude_contrast=0.1 "
                                 "or --assume voltage=300,cs=2.7")
        parser.add_argument("--device", type=str, default="auto", help="'auto', 'cpu' or 'cuda'")
        add_flag(parser, "--strict", False, "refuse particle files with NaN/Inf images (default: leave those "
                 "images out, with a warning naming their rows)")
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
    """Refuse outputs that are inputs or exist (unless ``overwrite``), before any work starts.

    Folders are created when the outputs are published (:func:`~cryo_lightning.io.output_set.output_set`).
    """
    resolved = {Path(p).resolve() for p in inputs}
    for path in outputs:
        if Path(path).resolve() in resolved:
            raise InputError(f"{path} is an input file; inputs are never overwritten: choose another --out or --stem")
        if Path(path).is_dir():
            raise InputError(f"output {path} is a folder; choose another --out")
        check_overwrite(path, overwrite)


def _stack_as_star(stack: Path, folder: Path, pixel_size: float | None) -> tuple[Path, list[str]]:
    """A STAR file (no CTF) describing a plain .mrcs stack, so it reads like any particle file,
    and warnings about the stack's pixel size."""
    if stack.is_dir():
        raise InputError(f"{stack} is a folder, not a stack; give the .mrcs file")
    info = read_stack_info(stack)
    pixel = pixel_size or info.pixel_size
    if pixel is None:
        raise InputError(f"{stack}: the header has no pixel size; pass --pixel-size")
    warnings = []
    if pixel_size is None and math.isclose(pixel, 1.0, abs_tol=1e-6):
        warnings.append(f"{stack}: the header's pixel size is 1.0 A, the value EMAN, IMOD and others write "
                        "when they do not know it; pass --pixel-size if it is not the real one")
    star = folder / f"{stack.stem}.star"
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [pixel], "rlnImageSize": [info.nx], "rlnImageDimensionality": [2]})
    particles = pd.DataFrame({"rlnImageName": image_names(str(stack.resolve()), info.n), "rlnOpticsGroup": 1})
    write_particles_star(star, optics, particles)
    return star, warnings


def open_particle_input(path: str | Path, scratch: Path, datadir: str | None, pixel_size: float | None,
                        assume: dict[str, float] | None, strict: bool = False, check_finite: bool = True):
    """Open a RELION STAR, a cryoSPARC .cs or a plain .mrcs/.mrc stack (described by a STAR written
    into ``scratch``, which must outlive the returned :class:`ParticleSource`). Images holding NaN
    or Inf are left out with a warning (refused with ``strict``; not checked without ``check_finite``).

    Messages about a plain stack name the stack, never the STAR written to describe it.
    """
    from cryo_lightning.data.particle_source import open_particles

    path = Path(path)
    if path.suffix.lower() not in (".mrcs", ".mrc"):
        return open_particles(path, datadir, pixel_size, assume, strict, check_finite)
    star, warnings = _stack_as_star(path, scratch, pixel_size)
    try:
        source = open_particles(star, datadir, pixel_size, assume, strict, check_finite)
    except InputError as err:
        raise InputError(str(err).replace(str(star), str(path))) from None
    source.warnings[:] = warnings + [w.replace(str(star), str(path)) for w in source.warnings]
    return source
