"""Particle I/O: the datamodule's streaming rate against a plain mrcfile.mmap loop, and STAR parsing.

1. A float32 stack (default 8192 images of 128 x 128, 512 MiB) and its STAR file are written to a
   temporary folder. The baseline reads it with ``mrcfile.mmap`` in slices of ``batch`` images
   and converts each slice to a torch tensor; the datamodule streams the same particles through
   ``ParticleDataModule`` (file order and shuffled sets of 16), including the transfer hook that
   converts to float32 (no other preprocessing); a last row adds the per-image CTF, which the
   hook computes on the device (the CPU here). A further row times the NaN/Inf check that every
   opening of a particle file runs over the images (``nonfinite_rows``). Baseline and other runs
   alternate; medians are reported. The file is in the page cache after the first pass, so this measures the
   software overhead, not the disk.
2. A RELION 3.1 STAR with ``--rows`` particles (default 500,000) is generated and read with
   ``read_particles`` (starfile parse + validation into the canonical table).

    python benchmarks/io.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import torch

from cryo_lightning.data.particles import ParticleDataModule

from cryo_lightning.data.particle_source import nonfinite_rows
from cryo_lightning.data.preprocess import PreprocessConfig
from cryo_lightning.io.particles import read_particles
from cryo_lightning.io.star import image_names, optics_block, write_particles_star


def make_dataset(folder: Path, n: int, L: int) -> Path:
    stack = folder / "bench.mrcs"
    rng = np.random.default_rng(0)
    with mrcfile.new_mmap(stack, shape=(n, L, L), mrc_mode=2) as m:
        m.set_image_stack()
        for i in range(0, n, 1024):
            m.data[i : i + 1024] = rng.standard_normal((min(1024, n - i), L, L), dtype=np.float32)
    particles = pd.DataFrame({"rlnImageName": image_names(stack.name, n), "rlnOpticsGroup": 1,
                              "rlnDefocusU": 15000.0, "rlnDefocusV": 14500.0, "rlnDefocusAngle": 10.0})
    star = folder / "bench.star"
    write_particles_star(star, optics_block(1.5, L, 300, 2.7, 0.1), particles)
    return star


def baseline(stack: Path, batch: int) -> int:
    count = 0
    with mrcfile.mmap(stack, permissive=True) as m:
        for i in range(0, m.data.shape[0], batch):
            x = torch.from_numpy(np.array(m.data[i : i + batch])).float()
            count += x.shape[0]
    return count


def through_datamodule(dm: ParticleDataModule, loader_name: str) -> int:
    count = 0
    for batch in getattr(dm, loader_name)():
        out = dm.on_after_batch_transfer(batch, 0)
        count += out["noisy"].shape[0] * out["noisy"].shape[1]
    return count


def finite_scan(dm: ParticleDataModule) -> int:
    """The check ``open_particles`` runs on every floating-point stack; returns the images read."""
    assert len(nonfinite_rows(dm.source)) == 0
    return len(dm.source)


def timed(fn, *args) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t0, n


def write_big_star(path: Path, rows: int) -> None:
    """A RELION 3.1 STAR of ``rows`` particles, written directly (starfile.write takes ~40 s)."""
    rng = np.random.default_rng(1)
    cols = ["rlnImageName", "rlnOpticsGroup", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
            "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnRandomSubset"]
    values = pd.DataFrame({
        "rlnImageName": [f"{i % 500 + 1:06d}@Extract/job012/Movies/mic{i // 500:05d}.mrcs" for i in range(rows)],
        "rlnOpticsGroup": 1,
        "rlnDefocusU": rng.uniform(5000, 25000, rows).round(2),
        "rlnDefocusV": rng.uniform(5000, 25000, rows).round(2),
        "rlnDefocusAngle": rng.uniform(0, 180, rows).round(2),
        "rlnAngleRot": rng.uniform(-180, 180, rows).round(4),
        "rlnAngleTilt": rng.uniform(0, 180, rows).round(4),
        "rlnAnglePsi": rng.uniform(-180, 180, rows).round(4),
        "rlnOriginXAngst": rng.normal(0, 3, rows).round(4),
        "rlnOriginYAngst": rng.normal(0, 3, rows).round(4),
        "rlnRandomSubset": rng.integers(1, 3, rows),
    })
    header = ("\n# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnOpticsGroupName #2\n"
              "_rlnAmplitudeContrast #3\n_rlnSphericalAberration #4\n_rlnVoltage #5\n_rlnImagePixelSize #6\n"
              "_rlnImageSize #7\n_rlnImageDimensionality #8\n1 opticsGroup1 0.1 2.7 300.0 1.0 256 2\n\n\n"
              "# version 30001\n\ndata_particles\n\nloop_\n" + "".join(f"_{c} #{i + 1}\n" for i, c in enumerate(cols)))
    with open(path, "w") as f:
        f.write(header)
        values.to_csv(f, sep=" ", header=False, index=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--batch", type=int, default=256, help="images per batch (baseline and file-order stream)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows", type=int, default=500_000, help="particles in the STAR parse benchmark")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    mb = args.images * args.box * args.box * 4 / 2**20
    results: dict = {"machine": f"{platform.processor() or platform.machine()}", "images": args.images,
                     "box": args.box, "stack_MiB": mb}
    with tempfile.TemporaryDirectory() as tmp:
        star = make_dataset(Path(tmp), args.images, args.box)
        stack = Path(tmp) / "bench.mrcs"
        def datamodule(set_size: int, stage: str, return_ctf: bool) -> ParticleDataModule:
            dm = ParticleDataModule(str(star), set_size=set_size, batch_size=args.batch // set_size,
                                    val_fraction=0.0, num_workers=0, return_ctf=return_ctf,
                                    preprocess=PreprocessConfig(normalize=False))
            dm.setup(stage)
            return dm

        streams = {
            "datamodule, file order": (datamodule(1, "predict", False), "predict_dataloader"),
            "datamodule, shuffled sets of 16": (datamodule(16, "fit", False), "train_dataloader"),
            "datamodule, shuffled sets of 16, with CTF": (datamodule(16, "fit", True), "train_dataloader"),
        }
        scan_name = "NaN/Inf check on opening (nonfinite_rows)"
        runs = {"mrcfile.mmap loop": [], **{name: [] for name in streams}, scan_name: []}
        baseline(stack, args.batch)  # warm the page cache
        for _ in range(args.repeats):
            runs["mrcfile.mmap loop"].append(timed(baseline, stack, args.batch))
            for name, (dm, loader) in streams.items():
                runs[name].append(timed(through_datamodule, dm, loader))
            runs[scan_name].append(timed(finite_scan, streams["datamodule, file order"][0]))
    print(f"Streaming {args.images} images of {args.box}^2 float32 ({mb:.0f} MiB), batches of {args.batch}, "
          f"median of {args.repeats}, 1 thread:\n")
    print("| reader | particles/s | MB/s | vs mrcfile.mmap (median of paired ratios) |")
    print("|---|---|---|---|")
    results["streaming"] = []
    base_rates = [n / t for t, n in runs["mrcfile.mmap loop"]]
    for name, values in runs.items():
        rates = [n / t for t, n in values]
        rate = statistics.median(rates)
        mbps = rate * args.box * args.box * 4 / 1e6
        # Each repeat runs every reader back to back: the paired ratio cancels the machine's drift.
        ratio = statistics.median(r / b for r, b in zip(rates, base_rates))
        results["streaming"].append({"reader": name, "particles_per_s": rate, "MB_per_s": mbps, "ratio": ratio})
        print(f"| {name} | {rate:,.0f} | {mbps:,.0f} | {ratio:.2f} |")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.star"
        write_big_star(path, args.rows)
        times = []
        for _ in range(3):
            t, table = timed(read_particles, path)
            times.append(t)
        assert len(table) == args.rows
    results["star_parse"] = {"rows": args.rows, "median_s": statistics.median(times)}
    print(f"\nSTAR parse: {args.rows:,} particles (RELION 3.1, 11 columns) read into the canonical table "
          f"in {statistics.median(times):.2f} s (median of 3; torch {torch.__version__})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
