"""Ab initio benchmark: common lines + synchronization + least squares, against the ground truth.

A held-out random molecule at ``L = 64`` (3 Angstrom pixels) is projected at uniform random
poses. For each case the poses are estimated by common lines and synchronization voting,
registered onto the true poses (rotation and handedness), and the map is reconstructed by
conjugate gradients with the registered poses; the FSC against the true volume gives the
resolution at 0.5. Cases:

* ``clean``: noise-free, CTF-free projections (300 and 1,000 images; the acceptance case and
  the timings to set beside ASPIRE's CLSyncVoting, 63 s and 0.01 degrees for 300 images on
  2 CPU cores);
* ``noisy``: images with a random CTF (defocus 1-2.5 um) and white noise at SNR 1/8 (and the
  ``--snrs`` sweep), phase-flipped for the common lines, reconstructed with their CTFs;
* ``class-averaged``: CTF-corrected class averages (``abinitio.class_average``, 10 neighbours)
  of the noisy images, one class per ``--centres`` selected centres;
* ``cwf``: the noisy images denoised by the covariance Wiener filter fitted on all of them,
  phase-flipped for the common lines; the map is reconstructed from the raw noisy images
  with their CTFs (denoising only serves the orientation search).

Writes ``benchmarks/results/abinitio.{json,md,png}``.

    python benchmarks/abinitio.py                    # every case, SNR 1/8, 1/16, 1/32 (about 12 min on 2 idle cores)
    python benchmarks/abinitio.py --cases clean      # the clean rows only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from cryo_lightning.abinitio.class_average import class_averages
from cryo_lightning.abinitio.common_lines import detect_common_lines
from cryo_lightning.abinitio.least_squares_reconstruction import reconstruct
from cryo_lightning.abinitio.synchronization import estimate_rotations
from cryo_lightning.denoise.cwf import cwf_denoise
from cryo_lightning.physics.ctf import ctf_2d, phase_flip, random_ctf_params
from cryo_lightning.physics.fourier import fourier_shell_correlation, resolution_at
from cryo_lightning.physics.image_formation import clean_images
from cryo_lightning.physics.noise import add_white_noise
from cryo_lightning.physics.projection import volume_spectrum
from cryo_lightning.physics.rotations import random_rotations, register_rotations
from cryo_lightning.physics.volumes import random_molecule

ROOT = Path(__file__).resolve().parents[1]
L, PIXEL = 64, 3.0
VOLUME_SEED = 20261125  # not a training-bank seed: the molecule is held out


def simulate(n: int, snr: float | None, with_ctf: bool, seed: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(seed)
    volume = random_molecule(L, torch.Generator().manual_seed(VOLUME_SEED)).to(device)
    rotations = random_rotations(n, generator=g).to(device)
    ctf = None
    if with_ctf:
        params = random_ctf_params(n, generator=g, defocus_range=(10000.0, 25000.0))
        ctf = ctf_2d(params, L, PIXEL).to(device)
    clean = clean_images(volume_spectrum(volume, 2, "kaiser_bessel"), rotations,
                         None if ctf is None else ctf[None]).reshape(n, L, L)
    noisy, noise_var = clean, 0.0
    if snr is not None:
        noisy, variance = add_white_noise(clean, snr, generator=g)
        noise_var = float(variance)
    return {"volume": volume, "rotations": rotations, "ctf": ctf, "clean": clean, "images": noisy,
            "noise_variance": noise_var}


def run_case(name: str, data: dict, lines_images: torch.Tensor, recon_images: torch.Tensor,
             recon_ctf: torch.Tensor | None, true_rotations: torch.Tensor, max_radius: float,
             snr: float | None = None, extra_seconds: float = 0.0, iterations: int = 30) -> dict:
    t0 = time.perf_counter()
    angles, _ = detect_common_lines(lines_images, max_radius=max_radius)
    t_lines = time.perf_counter() - t0
    sync = estimate_rotations(angles)
    t_orient = time.perf_counter() - t0
    reg = register_rotations(sync.rotations.double().cpu(), true_rotations.double().cpu())
    t1 = time.perf_counter()
    volume = reconstruct(recon_images, reg.aligned.to(recon_images), recon_ctf, lam=1e-3 if recon_ctf is None else 1e-2,
                         iterations=iterations).volume
    t_recon = time.perf_counter() - t1
    fsc = fourier_shell_correlation(volume, data["volume"], 3).cpu()
    res = resolution_at(fsc, 0.5, L, PIXEL)
    row = {"case": name, "snr": snr, "n_images": int(lines_images.shape[0]), "rotation_error_deg": round(reg.mean_error, 3),
           "median_error_deg": round(reg.median_error, 3), "reflected": reg.reflected,
           "fsc05_A": round(res, 2), "fsc05_nyquist": round(2 * PIXEL / res, 3) if math.isfinite(res) else 0.0,
           "seconds_common_lines": round(t_lines, 2), "seconds_orientations": round(t_orient, 2),
           "seconds_preprocess": round(extra_seconds, 2), "seconds_reconstruct": round(t_recon, 2),
           "fsc": [round(float(v), 4) for v in fsc]}
    print(f"{name:<28} n={row['n_images']:>5}  error {row['rotation_error_deg']:7.3f} deg (median "
          f"{row['median_error_deg']:.3f})  FSC0.5 {row['fsc05_A']:6.2f} A ({row['fsc05_nyquist']:.2f} Nyquist)  "
          f"orientations {t_orient:6.1f} s (+{extra_seconds:.1f} s preprocessing)  reconstruction {t_recon:.0f} s",
          flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["clean", "noisy", "class-averaged", "cwf"])
    p.add_argument("--clean-ns", type=int, nargs="+", default=[300, 1000])
    p.add_argument("--n-noisy", type=int, default=2000, help="noisy images per SNR")
    p.add_argument("--snrs", type=float, nargs="+", default=[1 / 8, 1 / 16, 1 / 32])
    p.add_argument("--centres", type=int, default=1000, help="class averages used for the common lines")
    p.add_argument("--max-radius", type=float, default=0.4, help="fraction of Nyquist for clean common lines")
    p.add_argument("--noisy-max-radius", type=float, default=0.25, help="the same for noisy/denoised images")
    p.add_argument("--iterations", type=int, default=15, help="CG iterations for the noisy cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "abinitio")
    p.add_argument("--merge", action="store_true", help="keep the other rows of an existing results file")
    args = p.parse_args()
    command = "python benchmarks/abinitio.py " + " ".join(sys.argv[1:])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {machine}; L = {L}, pixel {PIXEL} A; seed {args.seed}; volume seed {VOLUME_SEED}")
    rows = []
    if "clean" in args.cases:
        for n in args.clean_ns:
            data = simulate(n, None, False, args.seed + n, device)
            rows.append(run_case("clean", data, data["images"], data["images"], None, data["rotations"],
                                 args.max_radius))
    for snr in args.snrs:
        noisy_cases = [c for c in ("noisy", "class-averaged", "cwf") if c in args.cases]
        if not noisy_cases:
            break
        data = simulate(args.n_noisy, snr, True, args.seed + 7, device)
        label = f"SNR 1/{round(1 / snr)}"
        if "noisy" in noisy_cases:
            rows.append(run_case(f"noisy, {label}", data, phase_flip(data["images"], data["ctf"]), data["images"],
                                 data["ctf"], data["rotations"], args.noisy_max_radius, snr, iterations=args.iterations))
        if "class-averaged" in noisy_cases:
            t0 = time.perf_counter()
            classes = class_averages(data["images"], data["ctf"], data["noise_variance"], n_neighbors=10,
                                     centres=args.centres)
            t_ca = time.perf_counter() - t0
            rows.append(run_case(f"class-averaged, {label}", data, classes.averages, classes.averages, None,
                                 data["rotations"][classes.centres], args.noisy_max_radius, snr, t_ca,
                                 iterations=args.iterations))
        if "cwf" in noisy_cases:
            t0 = time.perf_counter()
            denoised = cwf_denoise(data["images"][None], data["ctf"][None],
                                   torch.tensor([data["noise_variance"]], device=device))[0]
            t_cwf = time.perf_counter() - t0
            rows.append(run_case(f"CWF-denoised, {label}", data, phase_flip(denoised, data["ctf"]), data["images"],
                                 data["ctf"], data["rotations"], args.noisy_max_radius, snr, t_cwf,
                                 iterations=args.iterations))
    for row in rows:
        row["command"] = command
        row["machine"] = machine
    path = args.out.with_suffix(".json")
    if args.merge and path.is_file():
        new = {(r["case"], r["n_images"]) for r in rows}
        kept = [r for r in json.loads(path.read_text())["rows"] if (r["case"], r["n_images"]) not in new]
        rows = kept + rows
    out = {"L": L, "pixel_size_A": PIXEL, "volume_seed": VOLUME_SEED, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    write_markdown(out, args.out.with_suffix(".md"))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')}, .md, .png")


def write_markdown(out: dict, path: Path) -> None:
    lines = [f"L = {out['L']}, pixel {out['pixel_size_A']} A (Nyquist {2 * out['pixel_size_A']:.0f} A). Poses "
             "registered onto the truth (rotation + hand). Machine and command per row in the JSON.", "",
             "| case | images | mean rotation error (deg) | median (deg) | FSC 0.5 vs truth (A) | fraction of Nyquist "
             "| orientation time (s) | preprocessing (s) | reconstruction (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['case']} | {r['n_images']} | {r['rotation_error_deg']:.2f} | {r['median_error_deg']:.2f} | "
                     f"{r['fsc05_A']:.1f} | {r['fsc05_nyquist']:.2f} | {r['seconds_orientations']:.1f} | "
                     f"{r['seconds_preprocess']:.1f} | {r['seconds_reconstruct']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        fsc = r["fsc"]
        freq = [k / (L * PIXEL) for k in range(len(fsc))]
        ax.plot(freq[1:], fsc[1:], label=f"{r['case']} ({r['n_images']})", lw=1.2)
    ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("spatial frequency (1/Angstrom)")
    ax.set_ylabel("FSC against the true volume")
    ax.set_ylim(-0.1, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
