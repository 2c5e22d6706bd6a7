"""``cryol export``: write a subset of particles by filtering the original STAR or .cs file.

Example::

    cryol export --star particles.star --rows keep.txt --out subset.star

``--rows`` is a text file of 0-based particle rows (one per line, ``#`` comments allowed);
``--random-subset 1`` keeps RELION half-set 1. The output keeps every original block and column
(optics groups that are no longer used are dropped) and still points at the original stacks.
"""

from __future__ import annotations

import sys

import numpy as np

from cryo_lightning.io.errors import InputError
from cryo_lightning.io.particle_table import read_particles
from cryo_lightning.io.particle_writer import export_subset
from cryo_lightning.tools.common import parse_assume, tool_parser

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Parse ``cryol export`` arguments and write the subset."""
    p = tool_parser("cryol export", __doc__)
    p.add_argument("--star", required=True, help="particles: RELION .star or cryoSPARC .cs")
    p.add_argument("--out", required=True, help="output .star (or .cs for a .cs input)")
    p.add_argument("--rows", type=str | None, default=None, help="text file of 0-based rows to keep")
    p.add_argument("--random-subset", type=int | None, default=None, help="keep this RELION half-set (1 or 2)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    # Filtering rows needs no pixel size: a placeholder keeps files without one readable.
    table = read_particles(args.star, pixel_size=args.pixel_size or 1.0, assume=parse_assume(args.assume))
    rows = np.arange(len(table))
    if args.rows:
        try:
            rows = np.loadtxt(args.rows, dtype=np.int64, comments="#", ndmin=1)
        except ValueError as err:
            raise InputError(f"{args.rows}: expected one integer row number per line ({err})") from None
    if args.random_subset is not None:
        keep = table.particles["random_subset"].to_numpy()[rows] == args.random_subset
        rows = rows[keep]
        if len(rows) == 0:
            raise InputError(f"{args.star}: no particle has rlnRandomSubset {args.random_subset}")
    out = export_subset(table, rows, args.out, overwrite=args.overwrite)
    print(f"Wrote {len(rows)} of {len(table)} particles to {out}")
