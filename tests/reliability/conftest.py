"""Shared pieces of the hostile-user tests: run a command, snapshot folders, small datasets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryo_lightning.cli import main


@pytest.fixture
def cryol(capsys):
    """A function: run ``cryol ARGS`` in-process; returns ``(exit code, stderr)``."""

    def run(*args: str) -> tuple[int, str]:
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.err
    return run


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Staging folders and temporary files that a failed or stopped command must not leave."""
    return [str(p) for p in Path(folder).rglob(".*") if p.name.endswith((".partial", ".tmp"))]


def strict_json(path: Path):
    """Parse JSON refusing the bare NaN/Infinity that Python's json module accepts by default."""
    def refuse(name: str):
        raise ValueError(f"{path}: invalid JSON constant {name}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def write_raw_stack(path: Path, images: np.ndarray, pixel: float) -> Path:
    """Write any values (NaN, Inf, huge) as a float32 stack: the project's writers refuse them."""
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(images.astype(np.float32))
        m.set_image_stack()
        m.voxel_size = pixel
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A simulated RELION 3.1 dataset (36 particles, box 32, 6 A/px, CTF, poses): inputs for
    every command. Tests copy it before corrupting it."""
    folder = tmp_path_factory.mktemp("dataset")
    main(["simulate", "--volume", "random", "--n-images", "36", "--box", "32", "--pixel-size", "6.0",
          "--snr", "0.5", "--seed", "3", "--out", str(folder)])
    return folder
