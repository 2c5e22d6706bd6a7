"""Seeded random corruptions of particle files: every case either loads or raises InputError.

The readers are the project's first line of defence: whatever a truncated copy, a hand edit or a
buggy exporter does to a STAR, .cs or MRC file, the user must get one clear message, never a
traceback from pandas, numpy or mrcfile. Real fixtures from ../shared are used when present, plus
files written here so that the test also runs in a fresh clone.
"""

from __future__ import annotations

import random
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryo_lightning.io.errors import InputError
from cryo_lightning.io.mrc import write_stack
from cryo_lightning.io.particles import read_particles
from cryo_lightning.io.stack_header import read_stack_info
from cryo_lightning.io.stack_reader import StackReader
from cryo_lightning.io.star import image_names, optics_block, write_particles_star
from tests.conftest import SHARED_DATA

REAL_STARS = ["cryodrgn/relion31.star", "cryodrgn/relion5.star", "cryodrgn/empiar_10076_7.star",
              "ASPIRE-Python/sample_particles_relion30.star", "ASPIRE-Python/rln_proj_64.star"]
REAL_CS = ["cryodrgn/empiar_10076_7.cs"]
REAL_STACKS = ["cryodrgn/relion31.mrcs", "cryodrgn/hand.5.mrcs", "ASPIRE-Python/sample.mrcs"]
TOKENS = ["nan", "inf", "-inf", "-1", "abc", "1e999", "0", "-0", "@", '"', "1@", "0@x.mrcs", "999999@x.mrcs",
          "\x00", "é", "1.5.2", "data_", "loop_", "_rlnVoltage"]


def _own_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """A RELION 3.1 STAR with CTF and poses and its float32 stack, written here."""
    n, box = 6, 16
    folder.mkdir()
    stack = folder / "own.mrcs"
    write_stack(stack, torch.randn(n, box, box, generator=torch.Generator().manual_seed(0)), 2.0)
    particles = pd.DataFrame({"rlnImageName": image_names("own.mrcs", n), "rlnOpticsGroup": 1,
                              "rlnDefocusU": 15000.0, "rlnDefocusV": 14800.0, "rlnDefocusAngle": 12.0,
                              "rlnAngleRot": 10.0, "rlnAngleTilt": 20.0, "rlnAnglePsi": 30.0,
                              "rlnOriginXAngst": 0.0, "rlnOriginYAngst": 0.0})
    star = folder / "own.star"
    write_particles_star(star, optics_block(2.0, box, 300.0, 2.7, 0.1), particles)
    return [star], [stack]


def _corrupt_text(data: bytes, rng: random.Random) -> bytes:
    lines = data.split(b"\n")
    op = rng.randrange(8)
    if op == 0:  # truncated copy
        return data[: rng.randrange(len(data))]
    if op == 1 and len(lines) > 1:  # a line lost
        del lines[rng.randrange(len(lines))]
    elif op == 2:  # a line repeated
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
    elif op == 3 and len(lines) > 1:  # lines swapped
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif op == 4:  # one value replaced
        i = rng.randrange(len(lines))
        words = lines[i].split()
        if words:
            words[rng.randrange(len(words))] = rng.choice(TOKENS).encode()
            lines[i] = b" ".join(words)
    elif op == 5:  # random bytes (not UTF-8 either)
        pos = rng.randrange(len(data))
        return data[:pos] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + data[pos:]
    elif op == 6:  # a label renamed or a block header lost
        i = rng.choice([k for k, line in enumerate(lines) if line.startswith((b"_", b"data_", b"loop_"))] or [0])
        lines[i] = lines[i][:-1] + b"x" if rng.random() < 0.5 else b""
    else:  # a value made huge or negative in a data row
        i = rng.randrange(len(lines))
        words = lines[i].split()
        numeric = [k for k, w in enumerate(words) if w.replace(b".", b"").replace(b"-", b"").isdigit()]
        if numeric:
            words[rng.choice(numeric)] = rng.choice([b"-1e6", b"1e30", b"-0.5", b"3"])
            lines[i] = b" ".join(words)
    return b"\n".join(lines)


def _corrupt_binary(data: bytes, rng: random.Random, header: int) -> bytes:
    buf = bytearray(data)
    op = rng.randrange(4)
    if op == 0:
        return bytes(buf[: rng.randrange(len(buf))])
    if op == 1:  # random bytes in the header
        for _ in range(rng.randint(1, 6)):
            buf[rng.randrange(min(header, len(buf)))] = rng.randrange(256)
    elif op == 2:  # one 32-bit header word set to an extreme
        word = rng.randrange(min(header, len(buf)) // 4)
        value = rng.choice([0, -1, 1, 3, 4, 2**31 - 1, -(2**31), rng.randrange(-1000, 100000)])
        buf[4 * word : 4 * word + 4] = int(value).to_bytes(4, "little", signed=True)
    else:  # random bytes anywhere
        for _ in range(rng.randint(1, 16)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    return bytes(buf)


def _expect_input_error(call, case: str, failures: list[str]) -> None:
    try:
        call()
    except InputError:
        pass
    except Exception as err:  # noqa: BLE001 - anything else is what this test exists to find
        frame = traceback.extract_tb(err.__traceback__)[-1]
        failures.append(f"{case}: {type(err).__name__} at {Path(frame.filename).name}:{frame.lineno}: "
                        f"{str(err)[:200]}")


def _fuzz(stars: list[Path], css: list[Path], stacks: list[Path], counts: tuple[int, int, int],
          rng: random.Random, work: Path, failures: list[str]) -> int:
    """Corrupt randomly chosen files ``counts`` = (STAR, .cs, MRC) times; returns the cases run."""
    cases = 0
    for _ in range(counts[0] if stars else 0):  # STAR files, read without their stacks: metadata only
        source = rng.choice(stars)
        target = work / source.name
        target.write_bytes(_corrupt_text(source.read_bytes(), rng))
        _expect_input_error(lambda: read_particles(target, pixel_size=rng.choice([None, 1.5])),
                            f"STAR {source.name} case {cases}", failures)
        cases += 1
    for _ in range(counts[1] if css else 0):  # cryoSPARC .cs (numpy .npy structured arrays)
        source = rng.choice(css)
        target = work / source.name
        target.write_bytes(_corrupt_binary(source.read_bytes(), rng, header=256))
        _expect_input_error(lambda: read_particles(target, pixel_size=1.0), f"CS {source.name} case {cases}",
                            failures)
        cases += 1
    for _ in range(counts[2] if stacks else 0):  # MRC stacks: header, then the first and last images
        source = rng.choice(stacks)
        target = work / source.name
        target.write_bytes(_corrupt_binary(source.read_bytes(), rng, header=1024))

        def read() -> None:
            info = read_stack_info(target)
            reader = StackReader([target])
            reader.read(np.zeros(2, np.int64), np.array([0, info.n - 1]))
            reader.close()

        _expect_input_error(read, f"MRC {source.name} case {cases}", failures)
        cases += 1
    return cases


def test_corrupted_particle_files_load_or_raise_input_error(tmp_path):
    """The files written here get the same cases everywhere (a fresh clone too); the real fixtures
    of ../shared, when present, get their own."""
    work = tmp_path / "case"
    work.mkdir()
    failures: list[str] = []
    stars, stacks = _own_files(tmp_path / "own")
    cases = _fuzz(stars, [], stacks, (300, 0, 200), random.Random(20261207), work, failures)
    if SHARED_DATA.is_dir():
        real = SHARED_DATA / "real"
        cases += _fuzz([real / p for p in REAL_STARS if (real / p).is_file()],
                       [real / p for p in REAL_CS if (real / p).is_file()],
                       [real / p for p in REAL_STACKS if (real / p).is_file()], (300, 100, 200),
                       random.Random(20261208), work, failures)
    assert cases >= 500
    assert not failures, f"{len(failures)} of {cases} corrupted files raised something else than InputError:\n" \
        + "\n".join(failures[:40])
