"""Example projections of the training distribution of the shipped denoisers (docs/data.md).

For each molecule family of ``cryo_lightning.physics.structures`` this draws molecules the way the
training bank of ``configs/denoise_guided_unet_real.yaml`` does (L = 64, its own pixel size
log-uniform in 1.5-12 A/px, diameter 0.3-0.95 of the box) and shows, per molecule, the projection,
the clean CTF-affected image (defocus 0.5-3.5 um, B-factor 0-150 A^2) and the noisy image at
SNR 1/16, with the family, pixel size and diameter. It also writes the family, pixel-size and
diameter counts of the first 400 training molecules as JSON.

    python benchmarks/training_distribution.py --out docs/images/training_distribution
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from cryo_lightning.data.molecule_bank import SPLITS, MoleculeBank, derive_seed
from cryo_lightning.physics.ctf import ctf_2d, random_ctf_params
from cryo_lightning.physics.image_formation import clean_images
from cryo_lightning.physics.noise import add_white_noise
from cryo_lightning.physics.projection import volume_spectrum
from cryo_lightning.physics.rotations import random_rotations
from cryo_lightning.physics.structures import STRUCTURE_FAMILIES, random_structure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel-range", type=float, nargs=2, default=[1.5, 12.0])
    p.add_argument("--per-family", type=int, default=2)
    p.add_argument("--census", type=int, default=400, help="training molecules summarised in the JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/images/training_distribution")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, lo, hi = args.box, *args.pixel_range
    rng = np.random.default_rng(args.seed)
    cols = len(STRUCTURE_FAMILIES) * args.per_family
    fig, axes = plt.subplots(3, cols, figsize=(1.25 * cols, 4.4))
    col = 0
    for f, family in enumerate(STRUCTURE_FAMILIES):
        for k in range(args.per_family):
            pixel = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            g = torch.Generator().manual_seed(derive_seed(args.seed, f, k))
            vol, info = random_structure(L, pixel, g, family=family)
            rot = random_rotations(1, generator=g)
            spec = volume_spectrum(vol[None])
            ctf = ctf_2d(random_ctf_params(1, generator=g, defocus_range=(5000.0, 35000.0), max_astigmatism=1000.0,
                                           bfactor=float(rng.uniform(0, 150))), L, pixel)
            proj = clean_images(spec, rot[None])[0, 0]
            clean = clean_images(spec, rot[None], ctf[None])[0]
            noisy, _ = add_white_noise(clean, 1 / 16, generator=g)
            for r, img in enumerate([proj, clean[0], noisy[0]]):
                ax = axes[r, col]
                ax.imshow(img.numpy(), cmap="gray")
                ax.set_xticks([])
                ax.set_yticks([])
            label = family + (f" {info['group']}" if "group" in info else "")
            axes[0, col].set_title(f"{label}\n{pixel:.1f} A/px, {info['diameter_A']:.0f} A", fontsize=6)
            col += 1
    for r, name in enumerate(["projection", "with CTF", "SNR 1/16"]):
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)

    bank = MoleculeBank(L, "train", args.census, 0, family="structures", pixel_size_range=(lo, hi))
    families, groups, pixels, diameters = Counter(), Counter(), [], []
    for i in range(args.census):
        g = torch.Generator().manual_seed(derive_seed(0, SPLITS.index("train"), i))
        _, info = random_structure(L, bank.pixel_size(i), g)  # what the bank renders for molecule i
        families[info["family"]] += 1
        if "group" in info:
            groups[info["group"][0] if info["group"][0] in "CD" else info["group"]] += 1
        pixels.append(bank.pixel_size(i))
        diameters.append(info["diameter_A"])
    census = {"molecules": args.census, "box": L, "families": dict(families), "point_groups": dict(groups),
              "pixel_size_A_quantiles": np.quantile(pixels, [0, 0.25, 0.5, 0.75, 1]).round(2).tolist(),
              "diameter_A_quantiles": np.quantile(diameters, [0, 0.25, 0.5, 0.75, 1]).round(0).tolist()}
    out.with_suffix(".json").write_text(json.dumps(census, indent=1) + "\n")
    print(json.dumps(census))
    print(f"Wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
