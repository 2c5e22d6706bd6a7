"""The shipped denoiser on real particles without ground truth: `cryol denoise` + `cryol evaluate`.

Runs `cryol denoise` (the default shipped model unless ``--model``/``--ckpt``) on each real
EMPIAR-derived fixture of ``../shared/data/real`` (7 to 17 particles each, boxes 48-320, pixel
sizes 1.3-4.9 A), as a user would, at the input's box and pixel size, then `cryol evaluate
--particles raw --denoised out` for what it can report without a truth (the moment consistency of
the denoised images with the raw ones' noise-debiased moments; the cross-validation FRC needs
poses and half sets, which only some fixtures carry, and a few hundred particles to mean much).
Writes a gallery PNG (raw | raw low-passed to 20 A for the eye | denoised, four particles per
fixture) and a JSON summary.

    python benchmarks/real_fixtures.py --out benchmarks/results/real_fixtures
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import starfile
import torch

from cryo_lightning.data.preprocess import background_stats
from cryo_lightning.io.mrc import read_stack
from cryo_lightning.physics.fourier import fft2c, ifft2c, radial_grid

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"

# name -> (STAR or stack relative to REAL, extra cryol arguments)
FIXTURES = {
    "empiar10076": ("cryodrgn/empiar_10076_7.star", []),
    "relion31": ("cryodrgn/relion31.star", []),
    "betagal_sample": ("ASPIRE-Python/sample_particles_relion31.star", []),
    "trpv1": ("cryojax/trpv1_small_stack.star", []),
}


def _trpv1_star(folder: Path) -> Path:
    """trpv1's STAR names `./batch_0_restacked.mrc`, absent: a copy that names the shipped stack."""
    src = REAL / "cryojax" / "trpv1_small_stack.star"
    blocks = starfile.read(src, always_dict=True)
    parts = blocks["particles"]
    stack = (REAL / "cryojax" / "trpv1_small_stack.mrcs").resolve()
    parts["rlnImageName"] = [f"{i + 1:06d}@{stack}" for i in range(len(parts))]
    out = folder / "trpv1_small_stack.star"
    starfile.write(blocks, out, overwrite=True)
    return out


def _low_pass(images: torch.Tensor, pixel: float, resolution: float = 20.0) -> torch.Tensor:
    L = images.shape[-1]
    s = radial_grid(L, 2) / (L * pixel)
    return ifft2c(fft2c(images) * torch.exp(-0.5 * (s * resolution) ** 2 * 4)).real


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="shipped model name (default: the default model)")
    p.add_argument("--ckpt", default=None, help="a checkpoint instead of a shipped model")
    p.add_argument("--fixtures", nargs="+", default=list(FIXTURES), choices=list(FIXTURES))
    p.add_argument("--out", default="benchmarks/results/real_fixtures")
    args = p.parse_args()
    if not REAL.is_dir():
        sys.exit(f"{REAL} not found: the shared test data are needed")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cryol = [sys.executable, "-m", "cryo_lightning"]
    pick = ["--ckpt", args.ckpt] if args.ckpt else (["--model", args.model] if args.model else [])
    summary, panels = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.fixtures:
            rel, extra = FIXTURES[name]
            star = _trpv1_star(tmp) if name == "trpv1" else REAL / rel
            den_dir, ev_dir = tmp / f"{name}_denoised", tmp / f"{name}_eval"
            run = subprocess.run([*cryol, "denoise", "--star", str(star), "--out", str(den_dir), *pick, *extra],
                                 capture_output=True, text=True)
            print(f"[{name}] cryol denoise exit {run.returncode}\n{run.stderr.strip()[-800:]}")
            if run.returncode != 0:
                summary[name] = {"denoise_exit": run.returncode, "stderr": run.stderr.strip()[-800:]}
                continue
            den_star = next(den_dir.glob("*.star"))
            ev = subprocess.run([*cryol, "evaluate", "--particles", str(star), "--denoised", str(den_star),
                                 "--out", str(ev_dir)], capture_output=True, text=True)
            print(f"[{name}] cryol evaluate exit {ev.returncode}\n{ev.stdout.strip()[-1500:]}\n{ev.stderr.strip()[-500:]}")
            metrics = json.loads((ev_dir / "metrics.json").read_text()) if (ev_dir / "metrics.json").is_file() else {}
            shutil.copytree(ev_dir, out.parent / f"{out.name}_{name}_evaluate", dirs_exist_ok=True) if ev_dir.is_dir() else None
            den_stack = next(den_dir.glob("*.mrcs"))
            raw_parts = starfile.read(star, always_dict=True)
            raw_names = (raw_parts.get("particles", next(iter(raw_parts.values()))))["rlnImageName"]
            idx, stack_name = raw_names.iloc[0].split("@")
            raw_stack = (Path(star).parent / stack_name) if not Path(stack_name).is_absolute() else Path(stack_name)
            raw = torch.from_numpy(np.asarray(read_stack(raw_stack), dtype=np.float32))
            den = torch.from_numpy(np.asarray(read_stack(den_stack), dtype=np.float32))
            den_parts = starfile.read(den_star, always_dict=True)
            pixel = float(den_parts["optics"]["rlnImagePixelSize"].iloc[0]) if "optics" in den_parts else 1.0
            mean, std = background_stats(raw, 0.75)
            raw_n = (raw - mean) / std
            summary[name] = {"particles": int(raw.shape[0]), "box": int(raw.shape[-1]), "pixel_size_A": pixel,
                             "output_box": int(den.shape[-1]), "evaluate_exit": ev.returncode, "evaluate": metrics,
                             "warnings": [ln for ln in run.stderr.splitlines() if "warning" in ln]}
            panels.append((name, raw_n[:4], _low_pass(raw_n[:4], pixel), den[:4]))
    (out.with_suffix(".json")).write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if panels:
        fig, axes = plt.subplots(3, 4 * len(panels), figsize=(1.3 * 4 * len(panels), 4.2), squeeze=False)
        for j, (name, raw_n, lp, den) in enumerate(panels):
            for k in range(raw_n.shape[0]):
                for r, img in enumerate([raw_n[k], lp[k], den[k]]):
                    ax = axes[r, 4 * j + k]
                    ax.imshow(img.numpy(), cmap="gray")
                    ax.set_xticks([])
                    ax.set_yticks([])
            axes[0, 4 * j].set_title(name, fontsize=8, loc="left")
        for r, label in enumerate(["raw", "raw, 20 A low-pass", "denoised"]):
            axes[r, 0].set_ylabel(label, fontsize=7)
        fig.tight_layout()
        fig.savefig(out.parent / f"{out.name}_gallery.png", dpi=100)
        plt.close(fig)
    print(json.dumps({k: {kk: v for kk, v in s.items() if kk != "evaluate"} for k, s in summary.items()}, indent=1))
    print(f"Wrote {out.with_suffix('.json')} and {out.parent / (out.name + '_gallery.png')}")


if __name__ == "__main__":
    main()
