"""Learned moment reconstructor vs the classical solver on held-out molecules, from a trained checkpoint.

    cryol fit --config configs/reconstructor_cpu.yaml
    python benchmarks/reconstructor.py --checkpoint runs/reconstructor_cpu/checkpoints/last.ckpt
    # a lower SNR (the exact row does not depend on it):
    python benchmarks/reconstructor.py --checkpoint ... --snr 0.03125 --n-images 1000 10000 100000 \
        --out benchmarks/results/reconstructor_snr32
    # the prior strength, chosen on validation molecules:
    python benchmarks/reconstructor.py --checkpoint ... --split val --n-images 10000 \
        --prior-strength 0.03 0.1 0.3 1 --no-classical --out benchmarks/results/reconstructor_tuning

Setting: the checkpoint's :class:`~cryo_lightning.data.moment_examples.MomentDataModule` (box,
SFB ``l_max``, band limit, viewing degree, CTF groups, third-moment slice). Held-out molecules:
the datamodule's test bank (never used in training or validation; ``--split val`` for tuning),
each under a random non-uniform viewing distribution, with exact moments or the debiased moments
of ``N`` simulated noisy CTF images at ``--snr``, for every ``N`` of ``--n-images``.

- Network: the e3nn unrolled solver alone, from a power-matched white start.
- Learned, no prior: the network, then ``--polish`` L-BFGS iterations of the moment loss (and
  the endgame below).
- Learned (strength ``k``): :class:`~cryo_lightning.tasks.learned_fit.LearnedFit`, i.e. ``cryol
  reconstruct --method learned``: the network, then the MAP polish with the checkpoint's
  coefficient prior weighted by ``k`` times the moments' expected sampling misfit; if the
  misfit is then above twice that, the classical endgame (whitened stage, ``--hops`` hops,
  ``--newton`` damped Newton steps). For exact moments every prior weight is 0, so the learned
  columns are one computation, run once.
- Classical: ``fit_moments`` with ``--starts`` random starts, stages (50, 200, 300) and the
  whitened stage, then ``--hops`` block basin hops and ``--newton`` Newton steps (the ``cryol
  reconstruct --method moments`` defaults).

Reported: O(3)-aligned relative coefficient error and seconds per reconstruction, per molecule
and as medians per N, in ``benchmarks/results/reconstructor.{json,md}``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path

import torch

from cryo_lightning.abinitio.moment_solver import fit_moments
from cryo_lightning.abinitio.volume_alignment import align_volumes
from cryo_lightning.data.moment_examples import MomentDataModule
from cryo_lightning.tasks.learned_fit import LearnedFit

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="ReconstructorTask checkpoint (cryol fit)")
    p.add_argument("--molecules", type=int, default=4, help="held-out molecules (test bank)")
    p.add_argument("--n-images", nargs="+", default=["exact", "1000", "10000", "100000"],
                   help="'exact' or image counts for the moments")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--polish", type=int, default=200, help="L-BFGS iterations after the network")
    p.add_argument("--prior-strength", type=float, nargs="+", default=[0.1],
                   help="prior weight(s) in units of the expected sampling misfit (one column each)")
    p.add_argument("--starts", type=int, default=2)
    p.add_argument("--hops", type=int, default=30)
    p.add_argument("--newton", type=int, default=20, help="damped Newton steps that end both solvers (0: none)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="molecule bank (val: for tuning)")
    p.add_argument("--no-classical", action="store_true", help="skip the classical solver")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reconstructor")
    args = p.parse_args()
    fit = LearnedFit(str(args.checkpoint), polish=args.polish, hops=args.hops, newton=args.newton)
    learned = {"network": (0, 0.0), "learned, no prior": (args.polish, 0.0)}
    learned.update({f"learned ({k:g})": (args.polish, k) for k in args.prior_strength})
    methods = list(learned) + ([] if args.no_classical else ["classical"])
    accepted = set(inspect.signature(MomentDataModule).parameters)
    base = {k: v for k, v in fit.settings.items() if k in accepted}
    rows = []
    for n in args.n_images:
        dm = MomentDataModule(**{**base, "n_images": None if n == "exact" else int(n), "snr": args.snr,
                                 "n_test_molecules": args.molecules, "n_val_molecules": args.molecules})
        stages = (50, 200, 300) if dm.third else (50, 400)
        for i in range(args.molecules):
            ex = dm.example(args.split, 0, i)
            model, target, truth = dm.moment_model, ex["moments"], ex["coeffs"]
            row, done = {"n_images": n, "molecule": i}, {}
            for name, (polish, strength) in learned.items():
                key = (polish, strength if n != "exact" else 0.0)  # exact moments: every prior weight is 0
                if key not in done:
                    fit.polish, fit.prior_strength = polish, strength
                    t = time.perf_counter()
                    a, _, _ = fit.reconstruct(model, target, torch.Generator().manual_seed(i))  # the same start
                    done[key] = (time.perf_counter() - t, align_volumes(dm.basis, truth, a).relative_error)
                row[f"{name} s"], row[f"{name} err"] = done[key]
            if not args.no_classical:
                res = fit_moments(model, target, n_starts=args.starts, iterations=stages, whiten=dm.third,
                                  hops=args.hops, newton=args.newton, generator=torch.Generator().manual_seed(i + 1))
                row["classical s"] = res.seconds
                row["classical err"] = align_volumes(dm.basis, truth, res.coeffs).relative_error
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    setting = {k: base.get(k) for k in ("box", "l_max", "bandlimit", "view_degree", "defocus_um", "third")}
    out = {"setting": {**setting, "checkpoint": str(args.checkpoint), "snr": args.snr, "polish": args.polish,
                       "prior_strength": args.prior_strength, "split": args.split, "starts": args.starts,
                       "hops": args.hops, "newton": args.newton, "threads": torch.get_num_threads()},
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2))
    md = [f"# Learned vs classical moment reconstruction (box {setting['box']}, l_max {setting['l_max']}, band limit "
          f"{setting['bandlimit']}, viewing degree {setting['view_degree']}, SNR {args.snr}, "
          f"{args.molecules} {'held-out' if args.split == 'test' else 'validation'} molecules; "
          f"{torch.get_num_threads()} threads)", "",
          "Medians over the molecules: aligned relative coefficient error (time per reconstruction, s).", "",
          "| moments | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for n in args.n_images:
        sel = [r for r in rows if r["n_images"] == n]
        cells = [f"{statistics.median(r[f'{m} err'] for r in sel):.3g} "
                 f"({statistics.median(r[f'{m} s'] for r in sel):.2f})" for m in methods]
        md.append(f"| {'exact' if n == 'exact' else f'N = {n}'} | " + " | ".join(cells) + " |")
    if not args.no_classical:
        main_method = f"learned ({args.prior_strength[0]:g})"
        md += ["", f"{main_method} / classical, ratio of median errors (speed-up of median times):"]
        for n in args.n_images:
            sel = [r for r in rows if r["n_images"] == n]
            med = {m: (statistics.median(r[f"{m} err"] for r in sel), statistics.median(r[f"{m} s"] for r in sel))
                   for m in (main_method, "classical")}
            ratio = med[main_method][0] / max(med["classical"][0], 1e-12)
            md.append(f"- {n}: {ratio:.2f} ({med['classical'][1] / med[main_method][1]:.0f}x)")
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
