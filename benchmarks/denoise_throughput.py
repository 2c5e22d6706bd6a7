"""`cryol denoise` throughput: particles per second at L = 128 for a checkpoint or a shipped model.

A RELION 3.1 stack of ``--n`` particles (a random molecule, ``cryol simulate``: L = ``--box``,
CTF, SNR 1/16) is denoised ``--repeats`` times after one warm-up run, and the median is reported.
Two timings, both stated in the output:

- ``library`` (checkpoints only): ``tools.denoise.denoise_particles`` in this process, i.e. the
  whole command without Python start-up and imports: checkpoint load, STAR read, preprocessing
  (background normalisation, CTF), the forward passes and the MRCS + STAR writes;
- ``subprocess``: ``cryol denoise`` as a user runs it, minus its start-up: the wall time on the
  ``--n`` particles minus the wall time on a 2-particle stack (both medians), so particles/s is
  ``(n - 2) / (t_n - t_2)``; the start-up time ``t_2`` is reported too. (Two particles, not one:
  ``cryol simulate --n-images 1`` fails, a 1-image stack reads back as a single 2D image.)

    python benchmarks/denoise_throughput.py --ckpt unet=runs/denoise_unet_cpu/checkpoints/last.ckpt
    python benchmarks/denoise_throughput.py --models NAME --threads 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from realmaps import ROOT, cryol_command, machine, shipped_models

STARTUP_N = 2  # particles of the start-up run


def simulate_stack(folder: Path, n: int, box: int, seed: int) -> Path:
    from cryo_lightning.tools.simulate import SimulateSettings, simulate

    paths = simulate(SimulateSettings(volume="random", n_images=n, box=box, pixel_size=300.0 / box, snr=1 / 16,
                                      out=str(folder), seed=seed, max_shift=2.0, device="cpu"))
    return paths["star"]


def time_library(ckpt: str, star: Path, out: Path, args) -> list[float]:
    from cryo_lightning.tools.denoise import denoise_particles

    times = []
    for r in range(args.repeats + 1):  # the first run warms up (allocator, page cache, lazy imports)
        t0 = time.perf_counter()
        denoise_particles(ckpt, str(star), str(out), set_size=args.set_size, device=args.device, overwrite=True)
        if r:
            times.append(time.perf_counter() - t0)
    return times


def time_subprocess(option: tuple[str, str], star: Path, out: Path, args) -> list[float]:
    cmd = [*cryol_command(), "denoise", "--star", str(star), "--out", str(out), *option, "--overwrite",
           "--set-size", str(args.set_size), "--device", args.device]
    times = []
    for r in range(args.repeats + 1):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        if r:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--ckpt", nargs="*", default=[], help="[LABEL=]PATH checkpoints")
    p.add_argument("--models", nargs="*", default=None,
                   help="shipped model names (default: those `cryol models --json` lists, when no --ckpt is given)")
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--n", type=int, default=256, help="particles per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="`cryol denoise --device`")
    p.add_argument("--threads", type=int, default=None, help="torch threads here (the subprocess inherits OMP_NUM_THREADS)")
    p.add_argument("--no-subprocess", action="store_true", help="library timing only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "denoise_throughput")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    entries = []
    for item in args.ckpt:
        label, _, path = item.rpartition("=")
        path_ = Path(path).resolve()
        entries.append((label or (path_.parent.parent.name if path_.parent.name == "checkpoints" else path_.stem),
                        ("--ckpt", str(path_))))
    names = args.models if args.models is not None else ([] if entries else shipped_models())
    entries += [(n, ("--model", n)) for n in names]
    if not entries:
        p.error("nothing to time: give --ckpt PATH or --models NAME (no shipped models are listed)")
    where = machine()
    print(f"machine: {where}", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="denoise_throughput_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        star = simulate_stack(tmp / "stack", args.n, args.box, args.seed)
        star1 = simulate_stack(tmp / "two", STARTUP_N, args.box, args.seed)
        print(f"simulated {args.n} + {STARTUP_N} particles at L = {args.box} in {time.perf_counter() - t0:.1f} s (seed {args.seed})")
        for label, option in entries:
            base = {"label": label, "model": f"{option[0]} {option[1]}", "box": args.box, "n_particles": args.n,
                    "set_size": args.set_size, "device": args.device, "repeats": args.repeats, "machine": where,
                    "torch_threads": torch.get_num_threads()}
            if option[0] == "--ckpt":
                times = time_library(option[1], star, tmp / "out_lib", args)
                median = statistics.median(times)
                rows.append({**base, "timing": "library: tools.denoise.denoise_particles in-process (no start-up)",
                             "runs_s": times, "median_s": median, "particles_per_s": args.n / median})
                print(f"{label} library: {args.n / median:.1f} particles/s (median {median:.2f} s of {times})", flush=True)
            if not args.no_subprocess:
                full = time_subprocess(option, star, tmp / "out_n", args)
                one = time_subprocess(option, star1, tmp / "out_1", args)
                t_n, t_1 = statistics.median(full), statistics.median(one)
                # start-up jitter (seconds) can exceed a fast model's denoising time: then there is no estimate
                rate = (args.n - STARTUP_N) / (t_n - t_1) if t_n > t_1 else float("nan")
                if t_n <= t_1:
                    print(f"{label} subprocess: the {args.n}-particle run was not slower than the start-up run; "
                          "use a larger --n", flush=True)
                rows.append({**base, "timing": f"subprocess: cryol denoise wall time on n particles minus on {STARTUP_N} particles",
                             "runs_s": full, "startup_runs_s": one, "median_s": t_n, "startup_s": t_1,
                             "particles_per_s": rate})
                print(f"{label} subprocess: {rate:.1f} particles/s (median {t_n:.2f} s for {args.n}, "
                      f"{t_1:.2f} s for {STARTUP_N} particles)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    lines = [f"`cryol denoise` throughput at L = {args.box}, {args.n} particles, set size {args.set_size}, device "
             f"{args.device}, median of {args.repeats} runs after a warm-up. Machine: {where}.",
             f"Command: `{shlex.join(['python', *sys.argv])}`", "",
             "| model | timing | particles/s | median s | start-up s |", "|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['timing'].split(':')[0]} | {r['particles_per_s']:.1f} | {r['median_s']:.2f} | "
              f"{r.get('startup_s', float('nan')):.2f} |" for r in rows]
    lines += ["", "library: `tools.denoise.denoise_particles` in-process (checkpoint load, STAR read, preprocessing, "
                  "forward passes, writes; no Python start-up). subprocess: `cryol denoise` wall time on the stack minus "
                  f"the wall time on a {STARTUP_N}-particle stack."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
