"""``cryol export``: write a subset of particles by filtering the original STAR or .cs file.

Example::

    cryol export --star particles.star --rows keep.txt --out subset.star

``--rows`` is a text file of 0-based particle rows (one per line, ``#`` comments allowed);
``--random-subset 1`` keeps RELION half-set 1. The output keeps every original block and column
(optics groups that are no longer used are dropped) and still points at the original stacks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from cryo_lightning.io.errors import InputError
from cryo_lightning.io.particle_writer import export_subset
from cryo_lightning.io.particles import read_particles
from cryo_lightning.tools.common import parse_assume, tool_parser

__all__ = ["read_rows", "main"]


def read_rows(path: str, n: int) -> np.ndarray:
    """0-based row numbers from a text file (one per line, ``#`` comments), each checked against the
    ``n`` particles, errors naming the line as an editor shows it (1-based)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--rows {path}: cannot be read as text ({getattr(err, 'strerror', None) or err})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            row = int(text)
        except ValueError:
            raise InputError(f"--rows {path}, line {number}: {text!r} is not a row number (0-based integers, "
                             "one per line)") from None
        if not 0 <= row < n:
            raise InputError(f"--rows {path}, line {number}: row {row} is out of range: the file has {n} "
                             f"particles, rows 0 to {n - 1} (0-based)")
        rows.append(row)
    if not rows:
        raise InputError(f"--rows {path} holds no row numbers: nothing to export")
    return np.asarray(rows, dtype=np.int64)


def main(argv: list[str] | None = None) -> None:
    """Parse ``cryol export`` arguments and write the subset."""
    p = tool_parser("cryol export", __doc__)
    p.add_argument("--star", required=True, help="particles: RELION .star or cryoSPARC .cs")
    p.add_argument("--out", required=True, help="output .star (or .cs for a .cs input)")
    p.add_argument("--rows", type=str | None, default=None, help="text file of 0-based rows to keep")
    p.add_argument("--random-subset", type=int | None, default=None, help="keep this half-set (1 or 2): "
                   "rlnRandomSubset in STAR files, alignments3D/split + 1 in .cs files")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    # Filtering rows needs no pixel size: a placeholder keeps files without one readable.
    table = read_particles(args.star, pixel_size=args.pixel_size or 1.0, assume=parse_assume(args.assume))
    for message in table.warnings:
        print(f"cryol export: warning: {message}", file=sys.stderr)
    rows = read_rows(args.rows, len(table)) if args.rows else np.arange(len(table))
    if args.rows and len(np.unique(rows)) < len(rows):
        print(f"cryol export: warning: --rows {args.rows} lists {len(rows) - len(np.unique(rows))} row(s) more "
              "than once; each is written as often as listed", file=sys.stderr)
    if args.random_subset is not None:
        if args.random_subset not in (1, 2):
            raise InputError(f"--random-subset {args.random_subset}: the half-sets are 1 and 2")
        keep = table.particles["random_subset"].to_numpy()[rows] == args.random_subset
        rows = rows[keep]
        if len(rows) == 0:
            label = "alignments3D/split" if table.format == "cryosparc" else "rlnRandomSubset"
            raise InputError(f"{args.star}: no particle{' of --rows' if args.rows else ''} is in half-set "
                             f"{args.random_subset} ({label})")
    out = export_subset(table, rows, args.out, overwrite=args.overwrite)
    print(f"Wrote {len(rows)} of {len(table)} particles to {out}")
