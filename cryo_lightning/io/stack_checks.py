"""Checks of particle stacks' headers against the metadata that references them: box and pixel size."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryo_lightning.io.errors import InputError, listed
from cryo_lightning.io.stack_header import StackInfo

__all__ = ["UNSET_PIXEL_SIZES", "check_box", "check_pixel_size"]

# Header pixel sizes that writers leave when they do not know the pixel size.
UNSET_PIXEL_SIZES = (0.0, 1.0)


def _as_lookup(value) -> tuple[float | None, dict[Path, float]]:
    if isinstance(value, Mapping):
        return None, {Path(k): v for k, v in value.items()}
    return value, {}


def check_box(
    infos: Sequence[StackInfo],
    expected_box: int | Mapping[str | os.PathLike, int],
    metadata_path: str | os.PathLike,
) -> None:
    """Check that the stacks hold square images of the box size the metadata declares.

    Args:
        infos: headers from :func:`~cryo_lightning.io.stack_header.read_stack_info` or ``StackReader.infos``.
        expected_box: box size in pixels (``rlnImageSize``, ``blob/shape``) for all stacks,
            or a mapping from stack path (as in ``StackInfo.path``) to its box size.
            Values of -1 (or stacks absent from the mapping) mean unknown: not checked.
        metadata_path: the STAR/.cs file, named in the message.
    Raises:
        InputError: one message listing every stack with non-square images or a box size
            different from the metadata's, with both sizes and the fix.
    """
    default, per_stack = _as_lookup(expected_box)
    not_square, mismatched = [], []
    for info in infos:
        if info.ny != info.nx:
            not_square.append(f"{info.path}: {info.ny}x{info.nx} pixels (rows x columns)")
            continue
        box = per_stack.get(Path(info.path), default)
        if box is not None and int(box) > 0 and int(box) != info.nx:
            mismatched.append(
                f"{info.path} holds {info.ny}x{info.nx} images but {metadata_path} says "
                f"the box is {int(box)} pixels"
            )
    if not_square:
        lines = [f"{len(not_square)} of {len(infos)} stacks hold non-square images:"]
        lines += listed(not_square)
        lines.append("Particle images must be square: re-extract them with a square box.")
        raise InputError("\n".join(lines))
    if mismatched:
        lines = [
            f"{len(mismatched)} of {len(infos)} stacks do not match the box size "
            f"(rlnImageSize / blob/shape) in {metadata_path}:"
        ]
        lines += listed(mismatched)
        lines.append(
            "Fix: make sure the metadata refers to these stacks (check --datadir), or "
            "correct rlnImageSize in the metadata's optics table if the stacks were "
            "re-extracted or rescaled."
        )
        raise InputError("\n".join(lines))


def check_pixel_size(
    infos: Sequence[StackInfo],
    expected_pixel_size: float | Mapping[str | os.PathLike, float],
    metadata_path: str | os.PathLike,
    rel_tol: float = 0.01,
    given: bool = False,
) -> str | None:
    """Compare the stacks' header pixel sizes with the metadata's (or the one the user gave).

    The metadata wins (RELION ignores MRC headers), so a difference is only reported.
    Header values of 0 and 1.0 are skipped: writers leave them when the pixel size is
    unknown. Such stacks cannot reveal a wrong metadata pixel size: e.g. the fixture
    ``sta_testing_bin8.star`` says 1.96 A for 8x binned images (about 15.7 A) whose header
    says 1.0, and it has no ``rlnImageSize``, so neither this check nor :func:`check_box`
    can detect the mismatch.

    Args:
        infos: headers from :func:`~cryo_lightning.io.stack_header.read_stack_info` or ``StackReader.infos``.
        expected_pixel_size: Angstrom, for all stacks or per stack path (as
            ``StackInfo.path``); missing or non-positive values are not checked.
        metadata_path: the STAR/.cs file, named in the message.
        rel_tol: tolerated relative difference.
        given: the expected value was given by the user (``--pixel-size``), not read from the file.
    Returns:
        A warning message naming both values for the first stacks that differ, or None.
    """
    default, per_stack = _as_lookup(expected_pixel_size)
    differing = []
    for info in infos:
        header = info.pixel_size
        expected = per_stack.get(Path(info.path), default)
        if header is None or expected is None or not expected > 0:
            continue
        if any(math.isclose(header, u, rel_tol=1e-6, abs_tol=1e-6) for u in UNSET_PIXEL_SIZES):
            continue
        if abs(header - expected) > rel_tol * expected:
            differing.append(
                f"{info.path}: header {header:.4g} A/px, {'--pixel-size' if given else 'metadata'} "
                f"{float(expected):.4g} A/px"
            )
    if not differing:
        return None
    lines = [
        f"{len(differing)} of {len(infos)} stacks have a header pixel size that differs by "
        f"more than {rel_tol:.0%} from {'--pixel-size' if given else metadata_path}:"
    ]
    lines += listed(differing)
    lines.append(
        "Using --pixel-size as given (it overrides the metadata and the headers)." if given else
        "Using the metadata's pixel size; if the images were binned or rescaled, fix the "
        "metadata (rlnImagePixelSize) or give the right value with --pixel-size."
    )
    return "\n".join(lines)
