"""The shipped denoisers on the project's own procedural molecules, in the setting of issue 21's table.

Issue 21 measured the shipped recipes of the time on ``cryol simulate --volume random`` (L = 32,
6 A/px, CTF, SNR 1/32, 2048 images): relative MSE 0.71 for the U-Net and 0.47 for the set
transformer; the shipped models must not do worse there. Per seed (each a different random
molecule, poses, CTFs and noise), this script runs ``cryol simulate`` and then ``cryol denoise``
with every shipped model as a user would (subprocess, RELION STAR + MRCS in, the output mapped
back to the clean images' units by the noisy images' per-particle background statistics, as
``benchmarks/realmaps.py`` does), beside the radial Wiener filter and the CWF fitted to the whole
stack with the realised noise variance. Rows: mean relative MSE over the images of all seeds, with
a 95% interval.

    python benchmarks/random_molecules.py --out benchmarks/results/random_molecules
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from realmaps import ROOT, cryol_command, machine, run_cli, shipped_models, summary, to_clean_units

from cryo_lightning.data.particle_source import metadata_batch, open_particles
from cryo_lightning.denoise.cwf import cwf_denoise
from cryo_lightning.denoise.wiener import wiener_denoise
from cryo_lightning.io.mrc import read_stack
from cryo_lightning.metrics import relative_mse
from cryo_lightning.physics.ctf import ctf_2d

ISSUE_FIGURES = {"U-Net (issue 21, configs/denoise_unet_cpu.yaml)": 0.71,
                 "set transformer (issue 21, configs/denoise_transformer_cpu.yaml)": 0.47}


def simulate(folder: Path, seed: int, args) -> Path:
    cmd = [*cryol_command(), "simulate", "--volume", "random", "--seed", str(seed), "--n-images", str(args.n_images),
           "--box", str(args.box), "--pixel-size", str(args.pixel_size), "--snr", str(args.snr), "--out", str(folder),
           "--overwrite"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return folder / "particles.star"


def stack_ctf(star: Path) -> torch.Tensor:
    """``(n, L, L)`` RELION-sign CTFs of the simulated particles, from their STAR rows."""
    source = open_particles(star)
    meta = metadata_batch(source, np.arange(len(source)))
    return ctf_2d(meta["ctf_params"], source.box, float(meta["pixel_size_A"].median()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--n-images", type=int, default=2048)
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--pixel-size", type=float, default=6.0)
    p.add_argument("--snr", type=float, default=1 / 32)
    p.add_argument("--models", nargs="*", default=None, help="shipped model names (default: all)")
    p.add_argument("--set-size", type=int, default=None)
    p.add_argument("--denoise-device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "random_molecules")
    args = p.parse_args()
    models = shipped_models() if args.models is None else args.models
    errors: dict[str, list[torch.Tensor]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="random_molecules_") as tmp:
        for seed in args.seeds:
            folder = Path(tmp) / f"seed{seed}"
            star = simulate(folder, seed, args)
            noisy = read_stack(folder / "particles.mrcs").float()
            clean = read_stack(folder / "particles_clean.mrcs").float()
            sigma2 = float((noisy - clean).double().square().mean())  # the realised noise variance
            ctf = stack_ctf(star)
            estimates = {"noisy": noisy}
            t = time.perf_counter()
            estimates["wiener"] = wiener_denoise(noisy[None], ctf[None], sigma2)[0]
            seconds["wiener"] = seconds.get("wiener", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            estimates["cwf"] = cwf_denoise(noisy[None], ctf[None], sigma2)[0]
            seconds["cwf"] = seconds.get("cwf", 0.0) + time.perf_counter() - t
            for name in models:
                raw, sec = run_cli(star, folder / name, ("--model", name), args)
                estimates[name] = to_clean_units(raw, noisy)
                seconds[name] = seconds.get(name, 0.0) + sec
            for method, est in estimates.items():
                err = relative_mse(est, clean)
                errors.setdefault(method, []).append(err)
                print(f"[seed {seed}] {method}: {float(err.mean()):.4f}", flush=True)
    rows = []
    for method, errs in errors.items():
        mean, ci = summary(torch.cat(errs))
        rows.append({"method": method, "rel_mse": mean, "ci95": ci, "per_seed": [float(e.mean()) for e in errs],
                     "seconds": seconds.get(method, 0.0), "box": args.box, "pixel_size": args.pixel_size,
                     "snr": args.snr, "n_images": args.n_images, "seeds": args.seeds})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    command = "python benchmarks/random_molecules.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k in ("seeds", "n_images", "box", "pixel_size", "snr"))
    lines = ["# Shipped denoisers on the project's random molecules", "", f"Command: `{command}`", "",
             f"Machine: {machine()}", "",
             f"`cryol simulate --volume random` per seed (L = {args.box}, {args.pixel_size} A/px, CTF, "
             f"SNR 1/{1 / args.snr:.0f}, {args.n_images} images); models through `cryol denoise`; Wiener and CWF "
             "on the whole stack with the realised noise variance. Mean relative MSE over all images "
             "+- 95% interval, then per seed; seconds summed over the seeds.", "",
             "| method | relative MSE | per seed | seconds |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['rel_mse']:.3f} +- {r['ci95']:.3f} | "
                     f"{' / '.join(f'{v:.3f}' for v in r['per_seed'])} | {r['seconds']:.1f} |")
    for label, value in ISSUE_FIGURES.items():
        lines.append(f"| {label} | {value:.2f} | - | - |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
