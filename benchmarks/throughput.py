"""Synthetic-data throughput: images per second of projection + CTF + noise (the set simulator).

Times the datamodule's generator (``SetSimulator``) at each box size with the default
Kaiser-Bessel projector, against the trilinear projector as the baseline in the same process,
and prints a Markdown table (median of the repeats, images/s) plus a JSON record.

    python benchmarks/throughput.py                       # CPU (and GPU if present), L = 64, 128
    python benchmarks/throughput.py --device cuda --sizes 64 128 256
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from cryo_lightning.data.molecule_bank import MoleculeBank
from cryo_lightning.data.set_simulator import SetSimulator, SimulationConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_simulator(L: int, device: torch.device, interpolation: str, set_size: int, batch: int,
                   repeats: int) -> dict:
    """Median wall time of simulating ``batch`` sets of ``set_size`` images at box ``L``."""
    bank = MoleculeBank(L, "train", n_molecules=batch, seed=0)
    config = SimulationConfig(set_size=set_size, pixel_size=300.0 / L, snr=(1 / 16, 1 / 16), ctf=True,
                              max_shift=2.0, interpolation=interpolation)
    sim = SetSimulator(bank, config)
    molecules = torch.arange(batch, device=device)
    for i in range(batch):  # molecules are generated once and cached; keep that out of the timing
        bank[i]
    times = []
    for r in range(repeats + 1):  # the first call warms up (allocator, kernels)
        seeds = torch.arange(batch, device=device) + 1000 * r
        _sync(device)
        t0 = time.perf_counter()
        sim(seeds, molecules, device=device)
        _sync(device)
        if r > 0:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"L": L, "device": str(device), "interpolation": interpolation, "set_size": set_size,
            "batch": batch, "repeats": repeats, "median_s": median, "images_per_s": batch * set_size / median}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines() if l.startswith("model name")]
        name = models[0] if models else name
    return f"{name}, {torch.get_num_threads()} threads"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--device", default="all", help="'cpu', 'cuda' or 'all' (cpu, plus cuda when present)")
    p.add_argument("--set-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=2, help="sets per call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [torch.device(d) for d in devices if d != "cuda" or torch.cuda.is_available()]

    rows = []
    print("| device | L | projector | images/s (median) | vs trilinear |")
    print("|---|---|---|---|---|")
    for device in devices:
        for L in args.sizes:
            base = time_simulator(L, device, "linear", args.set_size, args.batch, args.repeats)
            kb = time_simulator(L, device, "kaiser_bessel", args.set_size, args.batch, args.repeats)
            for row in (kb, base):
                row["machine"] = machine(device)
                rows.append(row)
                ratio = row["images_per_s"] / base["images_per_s"]
                print(f"| {row['machine']} | {L} | {row['interpolation']} | {row['images_per_s']:.0f} | {ratio:.2f}x |")
    print(f"\n(set size {args.set_size}, {args.batch} sets per call, CTF + shifts + noise, "
          f"median of {args.repeats}; torch {torch.__version__})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
