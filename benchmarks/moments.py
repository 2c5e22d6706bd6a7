"""Method-of-moments benchmark: forward model vs Monte Carlo, debiasing, classical solver, identifiability.

Setting (default, about 40 minutes on 2 CPU cores): L = 32, SFB volume basis with l_max = 3 and
band limit 0.25 cycles/pixel (105 coefficients), images in the Fourier-Bessel layout with
k <= 3 and the same band limit, viewing distribution ``SHViewingDistribution.random(8)``
(non-uniform, degree 8), two CTF groups (defocus 1.0 and 2.0 um, 300 kV, 3 A/pixel), a
held-out molecule (``random_molecule`` with seed 1000, not used by any test).

1. Forward model vs Monte Carlo: relative error of the empirical M1, M2 and M3 slice of N = 10^3, 10^4,
   10^5 clean images (pixel pipeline of ``abinitio/moment_forward_model.py``) against the model, with the
   Monte-Carlo standard error predicted from the samples; the error should fall like 1/sqrt(N).
2. Debiasing at SNR 0.3, 1/10 and 0.03 (``--snrs``): relative error of the debiased (and raw) M1,
   M2 and M3 against the model as N grows.
3. Classical solver (``fit_moments``, ``--starts`` random starts then ``--hops`` block basin
   hops): from exact moments and from the noisy moments of 10^4 and 10^5 images, with M1 + M2
   only and with the M3 stage plus the whitened stage; aligned relative coefficient error (O(3)),
   moment residual, time. Then the M3 solver from exact moments of further held-out molecules
   (``--more-seeds``), with and without the hops.
4. Identifiability: rank of the Jacobian of (M1, M2) (and of (M1, M2, M3)) w.r.t. (a, b) at the
   truth, for the pixel model and for the ideal steerable model (couplings between angular
   frequencies removed); the expected null space is 3-dimensional (global rotation).

    python benchmarks/moments.py            # writes benchmarks/results/moments.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from cryo_lightning.abinitio.image_moments import ImageMoments, MomentEstimator, MomentLayout
from cryo_lightning.abinitio.moment_forward_model import MomentModel
from cryo_lightning.abinitio.moment_simulation import MomentSimulator
from cryo_lightning.abinitio.moment_solver import fit_moments
from cryo_lightning.abinitio.volume_alignment import align_volumes, aligned_fsc, transform_viewing
from cryo_lightning.physics.ctf import CTFParams, ctf_2d
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.viewing_sh import SHViewingDistribution
from cryo_lightning.physics.volumes import random_molecule

ROOT = Path(__file__).resolve().parents[1]


def rel(x: list[torch.Tensor], y: list[torch.Tensor]) -> float:
    num = sum(float((a - b).abs().pow(2).sum()) for a, b in zip(x, y))
    return math.sqrt(num / sum(float(b.abs().pow(2).sum()) for b in y))


def ctfs_for(L: int) -> torch.Tensor:
    d = torch.tensor([10000.0, 20000.0], dtype=torch.float64)
    return ctf_2d(CTFParams(defocus_u=d, defocus_v=d, defocus_angle=0.0, voltage=300.0, cs=2.7,
                            amplitude_contrast=0.1), L, pixel_size=3.0)


def mc_table(sim: MomentSimulator, layout, model, a, dist, sizes, generator) -> list[dict]:
    m1, m2, m3 = model.with_third(a, dist.coeffs)
    rows = []
    for n in sizes:
        est = MomentEstimator(layout, sim.n_groups, third=True)
        t0 = time.perf_counter()
        coeffs = []
        for clean, _, groups in sim.images(a, dist, n, generator):
            est.update(clean, groups)
            if n <= 10_000:
                coeffs.append((layout.expand(clean), groups))
        mom = est.result()
        row = {"N": n, "rel_err_M1": rel([mom.m1], [m1]), "rel_err_M2": rel(mom.m2, m2),
               "rel_err_M3": rel(mom.m3, m3), "seconds": time.perf_counter() - t0}
        if coeffs:  # predicted Monte-Carlo standard error from the samples themselves
            c = torch.cat([x for x, _ in coeffs])
            g = torch.cat([y for _, y in coeffs])
            var1, var2 = 0.0, 0.0
            for grp in range(sim.n_groups):
                cg = c[g == grp]
                ng = cg.shape[0]  # E||mean - truth||^2 = sum of entry variances / n, per group
                var1 += float((cg - cg.mean(0)).abs().pow(2).sum()) / (ng - 1) / ng
                for ck in layout.split(cg):
                    outer = ck[:, :, None] * ck[:, None, :].conj()
                    var2 += float((outer - outer.mean(0)).abs().pow(2).sum()) / (ng - 1) / ng
            row["predicted_M1"] = math.sqrt(var1 / float(m1.abs().pow(2).sum()))
            row["predicted_M2"] = math.sqrt(var2 / sum(float(x.abs().pow(2).sum()) for x in m2))
        elif rows and "predicted_M1" in rows[-1]:  # extrapolate the standard error as 1 / sqrt(N)
            f = math.sqrt(rows[-1]["N"] / n)
            row["predicted_M1"], row["predicted_M2"] = rows[-1]["predicted_M1"] * f, rows[-1]["predicted_M2"] * f
        rows.append(row)
        print(f"MC N={n}: M1 {row['rel_err_M1']:.2e} M2 {row['rel_err_M2']:.2e} M3 {row['rel_err_M3']:.2e}"
              + (f" (predicted {row['predicted_M1']:.2e}, {row['predicted_M2']:.2e})" if "predicted_M1" in row else ""))
    return rows


def noisy_moments(sim: MomentSimulator, a, dist, sizes, snr, generator) -> tuple[dict[int, ImageMoments], float]:
    """Debiased moments of the first N noisy images for N in sizes, and the noise variance (SNR of physics/noise.py)."""
    std = sim.noise_std(a, dist, snr, generator)
    return sim.moments(a, dist, sizes, generator, noise_std=std, third=True), std**2


def jacobian_null_dims(L, l_max, bandlimit, degree, steerable, seed=0, third=False) -> tuple[int, int]:
    g = torch.Generator().manual_seed(seed)
    basis = SphericalFourierBesselBasis(L, l_max=l_max, bandlimit=bandlimit)
    layout = MomentLayout(L, l_max)
    model = MomentModel(basis, layout, degree, third=third)
    if steerable:
        # Continuous-disk steerability: component e^{-i m psi} only in block k = m, none at e^{+i m psi}.
        k = layout.angular_index
        model._P0 = model._P0 * (k == 0)[None, :, None]
        for m, (U, W) in enumerate(zip(model._U, model._W), start=1):
            U.zero_()
            W.mul_((k == m)[None, :, None])
    a = basis.expand(random_molecule(L, g, dtype=torch.float64))
    dist = SHViewingDistribution.random(degree, generator=g)
    na = a.numel()

    def residual(x: torch.Tensor) -> torch.Tensor:
        b = torch.cat([x.new_ones(1), x[na:]])
        if third:
            m1, m2, m3 = model.with_third(x[:na], b)
            m2 = m2 + m3
        else:
            m1, m2 = model(x[:na], b)
        r = torch.cat([m1.flatten()] + [m.flatten() for m in m2])
        return torch.cat([r.real, r.imag])

    J = torch.func.jacfwd(residual)(torch.cat([a, dist.coeffs[1:]]))
    s = torch.linalg.svdvals(J)
    return int((s < 1e-10 * s[0]).sum()), J.shape[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--L", type=int, default=32)
    p.add_argument("--l-max", type=int, default=3)
    p.add_argument("--bandlimit", type=float, default=0.25)
    p.add_argument("--view-degree", type=int, default=8)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--mc-sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    p.add_argument("--noisy-sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--snrs", type=float, nargs="+", default=[0.3, 0.1, 0.03], help="SNRs of the debiasing table")
    p.add_argument("--starts", type=int, default=2)
    p.add_argument("--hops", type=int, default=30, help="block basin hops after the best start")
    p.add_argument("--more-seeds", type=int, nargs="*", default=[1001, 1002, 1003],
                   help="further held-out molecules for the exact-moment solver table")
    p.add_argument("--iterations", type=int, nargs=2, default=[50, 400], help="M1 and M1+M2 stages")
    p.add_argument("--iterations-m3", type=int, nargs=3, default=[50, 200, 300],
                   help="M1, M1+M2 and M1+M2+M3 stages (then the same again, whitened)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "moments")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"seed {args.seed}; L={args.L} l_max={args.l_max} bandlimit={args.bandlimit} degree={args.view_degree}")
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    basis = SphericalFourierBesselBasis(args.L, l_max=args.l_max, bandlimit=args.bandlimit)
    layout = MomentLayout(args.L, args.l_max, bandlimit=args.bandlimit)
    ctfs = ctfs_for(args.L)
    model = MomentModel(basis, layout, args.view_degree, ctfs=ctfs, third=True)
    setup = time.perf_counter() - t0
    a = basis.expand(random_molecule(args.L, g, dtype=torch.float64))
    dist = SHViewingDistribution.random(args.view_degree, generator=g)
    results: dict = {"setting": {"L": args.L, "l_max": args.l_max, "bandlimit": args.bandlimit,
                                 "view_degree": args.view_degree, "seed": args.seed,
                                 "sfb_count": basis.layout.count, "image_count": layout.count,
                                 "ctf_groups": 2, "model_setup_s": setup, "starts": args.starts,
                                 "threads": torch.get_num_threads()}}

    sim = MomentSimulator(basis, layout, ctfs)
    results["monte_carlo"] = mc_table(sim, layout, model, a, dist, args.mc_sizes, g)

    snr = 0.1
    noisy, sigma2 = noisy_moments(sim, a, dist, args.noisy_sizes, snr, g)
    m1, m2, m3 = model.with_third(a, dist.coeffs)
    results["debias"] = []
    # SNR 1/10 first (its moments feed the solver), then the other SNRs from their own generator
    gs = torch.Generator().manual_seed(args.seed + 77)
    by_snr = [(snr, noisy, sigma2)] + [(x, *noisy_moments(sim, a, dist, args.noisy_sizes, x, gs))
                                       for x in args.snrs if x != snr]
    for snr_i, moms, var in by_snr:
        for n, mom in sorted(moms.items()):
            raw = [b + var * torch.eye(b.shape[-1], dtype=b.dtype) for b in mom.m2]
            row = {"N": n, "snr": snr_i, "rel_err_M1": rel([mom.m1], [m1]), "rel_err_M2_debiased": rel(mom.m2, m2),
                   "rel_err_M2_raw": rel(raw, m2), "rel_err_M3_debiased": rel(mom.m3, m3)}
            results["debias"].append(row)
            print(f"debias SNR {snr_i:g} N={n}: M2 debiased {row['rel_err_M2_debiased']:.3f} "
                  f"raw {row['rel_err_M2_raw']:.3f}")

    one = torch.ones(2, dtype=torch.float64)
    exact = ImageMoments(m1.detach(), [x.detach() for x in m2], one, 0 * one, [x.detach() for x in m3])
    results["solver"] = []
    cases = [(name, target, terms) for name, target in
             [("exact", exact)] + [(f"N={n}, SNR 1/10", mom) for n, mom in sorted(noisy.items())]
             for terms in ("M1+M2", "M1+M2+M3, whitened")]
    for name, target, terms in cases:
        third = terms != "M1+M2"
        res = fit_moments(model, target, n_starts=args.starts,
                          iterations=tuple(args.iterations_m3 if third else args.iterations), whiten=third,
                          hops=args.hops, generator=torch.Generator().manual_seed(args.seed + 1))
        al = align_volumes(basis, a, res.coeffs)
        b_al = transform_viewing(res.view_coeffs, args.view_degree, al.rotation, al.reflected)
        fsc = aligned_fsc(basis, a, al.aligned)
        row = {"moments": name, "terms": terms, "loss": res.loss, "aligned_rel_err": al.relative_error,
               "view_rel_err": float((b_al - dist.coeffs).norm() / dist.coeffs.norm()),
               "fsc_min_below_bandlimit": float(fsc[1 : int(args.bandlimit * args.L)].min()),
               "seconds": res.seconds, "evaluations": res.evaluations, "start_losses": res.losses,
               "hops": args.hops, "hops_accepted": res.hops_accepted}
        results["solver"].append(row)
        print(f"solver {name} {terms}: loss {res.loss:.2e} aligned err {al.relative_error:.3f} "
              f"view err {row['view_rel_err']:.3f} time {res.seconds:.0f} s")

    results["molecules"] = []
    for seed in [args.seed] + list(args.more_seeds):
        gm = torch.Generator().manual_seed(seed)
        am = basis.expand(random_molecule(args.L, gm, dtype=torch.float64))
        dm = SHViewingDistribution.random(args.view_degree, generator=gm)
        with torch.no_grad():
            t1, t2, t3 = model.with_third(am, dm.coeffs)
        target = ImageMoments(t1, t2, one, 0 * one, t3)
        no_hop = fit_moments(model, target, n_starts=args.starts, iterations=tuple(args.iterations_m3), whiten=True,
                             generator=torch.Generator().manual_seed(seed + 1))
        # the hops continue from the staged fit above (one more iteration per stage switches the M3 terms on)
        res = fit_moments(model, target, n_starts=1, iterations=(0, 0, 1), whiten=True, hops=args.hops,
                          init=(no_hop.coeffs, no_hop.view_coeffs), generator=torch.Generator().manual_seed(seed + 2))
        hop_s = no_hop.seconds + res.seconds
        row = {"seed": seed, "loss_no_hops": no_hop.loss, "aligned_rel_err_no_hops":
               align_volumes(basis, am, no_hop.coeffs).relative_error, "seconds_no_hops": no_hop.seconds,
               "loss": res.loss, "aligned_rel_err": align_volumes(basis, am, res.coeffs).relative_error,
               "hops_accepted": res.hops_accepted, "seconds": hop_s}
        results["molecules"].append(row)
        print(f"molecule {seed}: no hops loss {row['loss_no_hops']:.2e} err {row['aligned_rel_err_no_hops']:.3f}; "
              f"{args.hops} hops loss {row['loss']:.2e} err {row['aligned_rel_err']:.3f} ({hop_s:.0f} s)", flush=True)

    results["identifiability"] = []
    for cfg in [(32, 1, 0.25, 2), (32, 2, 0.25, 2), (32, 2, 0.25, 4), (32, 3, 0.25, 4), (32, 4, 0.25, 4)]:
        for steerable in (True, False):
            null, n = jacobian_null_dims(*cfg, steerable=steerable)
            null3, _ = jacobian_null_dims(*cfg, steerable=steerable, third=True)
            row = {"L": cfg[0], "l_max": cfg[1], "bandlimit": cfg[2], "view_degree": cfg[3],
                   "model": "steerable" if steerable else "pixel grid", "unknowns": n, "null_dims": null,
                   "null_dims_with_m3": null3}
            results["identifiability"].append(row)
            print(f"identifiability {row}")
    results["total_s"] = time.perf_counter() - t0

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {args.out.with_suffix('.json')} and .md in {results['total_s']:.0f} s")


def markdown(r: dict) -> str:
    s = r["setting"]
    lines = [f"# Method of moments (L = {s['L']}, l_max = {s['l_max']}, band limit {s['bandlimit']}, "
             f"viewing degree {s['view_degree']}, {s['ctf_groups']} CTF groups, seed {s['seed']}; "
             f"{s['sfb_count']} volume / {s['image_count']} image coefficients)", "",
             "## Forward model vs Monte Carlo (clean images)", "",
             "| N | rel. err. M1 | rel. err. M2 | rel. err. M3 slice | predicted MC err. M1 | predicted MC err. M2 |",
             "|---|---|---|---|---|---|"]
    for row in r["monte_carlo"]:
        lines.append(f"| {row['N']} | {row['rel_err_M1']:.2e} | {row['rel_err_M2']:.2e} | {row['rel_err_M3']:.2e} | "
                     f"{row.get('predicted_M1', float('nan')):.2e} | {row.get('predicted_M2', float('nan')):.2e} |")
    lines += ["", "Predicted: the standard error of the sample means, estimated from the samples "
              "(for N > 10^4 extrapolated from 10^4 as 1/sqrt(N)).",
              "", "## Noise debiasing", "", "| SNR | N | rel. err. M1 | M2 debiased | M2 raw | M3 slice debiased |",
              "|---|---|---|---|---|---|"]
    for row in sorted(r["debias"], key=lambda x: (-x["snr"], x["N"])):
        lines.append(f"| {row['snr']:g} | {row['N']} | {row['rel_err_M1']:.3f} | {row['rel_err_M2_debiased']:.3f} | "
                     f"{row['rel_err_M2_raw']:.3f} | {row['rel_err_M3_debiased']:.3f} |")
    lines += ["", "## Classical solver", "",
              "| moments | terms | final loss | aligned rel. err. (coefficients) | viewing rel. err. | min FSC below band limit | time (s) |",
              "|---|---|---|---|---|---|---|"]
    for row in r["solver"]:
        lines.append(f"| {row['moments']} | {row['terms']} | {row['loss']:.2e} | {row['aligned_rel_err']:.3f} | {row['view_rel_err']:.3f} | "
                     f"{row['fsc_min_below_bandlimit']:.3f} | {row['seconds']:.0f} |")
    hops = r["solver"][0]["hops"] if r["solver"] else 0
    lines += ["", f"{s.get('starts', '?')} random starts, then {hops} block basin hops. Final loss: relative misfit "
              "of the terms used (whitened for the M3 rows).",
              "", "## Held-out molecules, exact moments, M1+M2+M3 whitened", "",
              "| molecule seed | loss, no hops | aligned rel. err., no hops | time (s) | loss, with hops | "
              "aligned rel. err., with hops | hops accepted | time (s) |", "|---|---|---|---|---|---|---|---|"]
    for row in r.get("molecules", []):
        lines.append(f"| {row['seed']} | {row['loss_no_hops']:.2e} | {row['aligned_rel_err_no_hops']:.3f} | "
                     f"{row['seconds_no_hops']:.0f} | {row['loss']:.2e} | {row['aligned_rel_err']:.3f} | "
                     f"{row['hops_accepted']}/{hops} | {row['seconds']:.0f} |")
    lines += ["",
              "", "## Identifiability: null space of the Jacobian at the truth (3 = rotations only)", "",
              "| L | l_max | band limit | viewing degree | model | unknowns | null dims (M1, M2) | null dims (M1, M2, M3) |",
              "|---|---|---|---|---|---|---|---|"]
    for row in r["identifiability"]:
        lines.append(f"| {row['L']} | {row['l_max']} | {row['bandlimit']} | {row['view_degree']} | {row['model']} | "
                     f"{row['unknowns']} | {row['null_dims']} | {row['null_dims_with_m3']} |")
    lines += ["", f"Total time {r['total_s']:.0f} s on {s['threads']} threads."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
