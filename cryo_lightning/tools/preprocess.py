"""``cryol preprocess``: downsample, normalise, invert, phase-flip or whiten a particle stack.

Example::

    cryol preprocess --star particles.star --box 64 --out prep/

reads a RELION STAR (3.0, 3.1/4, 5) or cryoSPARC .cs file and its stacks, and writes
``prep/<stem>.mrcs`` (the processed images, in the input's particle order) and ``prep/<stem>.star``
(RELION 3.1: every original column kept, image names pointing at the new stack, pixel size and
box updated in a complete optics block).
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse.typing import PositiveInt
import numpy as np
import torch

from cryo_lightning.data.particle_source import estimate_noise_psd, open_particles, preprocessed_chunks
from cryo_lightning.data.preprocess import CTF_MODES, PreprocessConfig, Preprocessor
from cryo_lightning.io.errors import InputError
from cryo_lightning.io.mrc import StackWriter
from cryo_lightning.io.output_set import output_set
from cryo_lightning.io.particle_writer import write_star_for_stack
from cryo_lightning.tools.common import add_flag, parse_assume, pick_device, prepare_outputs, tool_parser

__all__ = ["preprocess", "main"]


def preprocess(
    star: str,
    out: str,
    config: PreprocessConfig,
    datadir: str | None = None,
    pixel_size: float | None = None,
    assume: dict[str, float] | None = None,
    stem: str | None = None,
    batch_size: int = 256,
    float16: bool = False,
    device: str = "auto",
    overwrite: bool = False,
    strict: bool = False,
) -> tuple[Path, Path]:
    """Preprocess every particle of ``star`` (STAR or .cs) into a new stack + STAR in ``out``.

    Images holding NaN or Inf are left out (with a warning) or, with ``strict``, refused."""
    source = open_particles(star, datadir, pixel_size, assume, strict)
    for message in source.warnings:
        print(f"cryol preprocess: warning: {message}", file=sys.stderr)
    stem = stem or Path(star).stem
    out_dir = Path(out)
    stack_path, star_path = out_dir / f"{stem}.mrcs", out_dir / f"{stem}.star"
    prepare_outputs([stack_path, star_path], [Path(star), *(i.path for i in source.reader.infos)], overwrite)
    dev = pick_device(device)

    processor = Preprocessor(config, source.box)
    if config.whiten:
        processor.noise_psd = estimate_noise_psd(source, processor)
    n, L_out = len(source), processor.out_box
    pixel_out = np.empty(n)
    with output_set({"stack": stack_path, "star": star_path}, overwrite) as staged:
        with StackWriter(staged["stack"], n, L_out, float(source.table.particles["pixel_size_A"].median() * source.box / L_out),
                         dtype=torch.float16 if float16 else torch.float32) as writer:
            for rows, result, _ in preprocessed_chunks(source, np.arange(n), processor, dev, batch_size,
                                                       desc="preprocessing"):
                writer.write(result["images"].cpu())
                pixel_out[rows] = result["pixel_size"].cpu().numpy()
        write_star_for_stack(source.table, staged["star"], staged["stack"], L_out, pixel_out,
                             ctf_mode=processor.ctf_mode(source.ctf_mode(config)))
    return stack_path, star_path


def main(argv: list[str] | None = None) -> None:
    """Parse ``cryol preprocess`` arguments and run :func:`preprocess`."""
    p = tool_parser("cryol preprocess", __doc__)
    p.add_argument("--star", required=True, help="particles: RELION .star or cryoSPARC .cs")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--box", "--downsample", dest="box", type=PositiveInt | None, default=None,
                   help="output box size: smaller crops the spectrum (coarser pixels), larger pads it")
    add_flag(p, "--normalize", True, "background mean 0 and std 1")
    p.add_argument("--background-radius", type=float, default=0.75, help="background starts at this fraction of L/2")
    add_flag(p, "--invert-contrast", False, "multiply by -1 (on top of the data sign)")
    add_flag(p, "--phase-flip", False, "phase-flip the images with their CTF")
    add_flag(p, "--whiten", False, "whiten by the noise spectrum of the background")
    p.add_argument("--ctf-mode", type=str | None, default=None, help=f"override what the stored images are: {CTF_MODES}")
    add_flag(p, "--float16", False, "write the stack as float16 (MRC mode 12)")
    p.add_argument("--batch-size", type=PositiveInt, default=256, help="images processed at a time")
    p.add_argument("--stem", type=str, default=None, help="output file stem (default: the input's)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = PreprocessConfig(out_box=args.box, normalize=args.normalize,
                                  background_radius=args.background_radius, invert_contrast=args.invert_contrast,
                                  ctf_mode=args.ctf_mode, phase_flip=args.phase_flip, whiten=args.whiten)
    except ValueError as err:
        raise InputError(f"--{str(err).split(' ')[0].replace('_', '-')}: {err}") from None
    stack, star = preprocess(args.star, args.out, config, args.datadir, args.pixel_size, parse_assume(args.assume),
                             args.stem, args.batch_size, args.float16, args.device, args.overwrite,
                             args.strict)
    print(f"Wrote {stack} and {star}")
