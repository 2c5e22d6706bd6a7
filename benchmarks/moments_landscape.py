"""Why the classical moment solver misses: basin of the truth, local minima, conditioning.

Same setting as ``benchmarks/moments.py`` (L = 32, SFB ``l_max = 4``, band limit 0.5, viewing
degree 4, two CTF groups, held-out molecule seed 1000), exact moments with the third-moment
slice, and the solver's last two stages (M1 + M2 + M3, then whitened; ``fit_moments`` with
``iterations = (0, 0, n)``):

1. Basin of the truth: start at relative distance ``eps`` from the true coefficients (random
   direction, true viewing distribution) and fit; a start inside the basin ends near 0.
2. Random starts: the full staged fit, then ``--continue`` more iterations of the last two
   stages; a loss that stays far above 0 while the error stays put is a local minimum, not
   slow convergence along a valley of equal moments.
3. Conditioning: singular values of the Jacobian of the whitened ``(M1, M2, M3)`` residual at
   the truth (3 exact nulls = rotations), i.e. how flat the loss is around the solution.

    python benchmarks/moments_landscape.py   # writes benchmarks/results/moments_landscape.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cryo_lightning.abinitio.image_moments import ImageMoments, MomentLayout
from cryo_lightning.abinitio.moment_forward_model import MomentModel
from cryo_lightning.abinitio.moment_loss import whiten_moments, whitening_scales
from cryo_lightning.abinitio.moment_solver import fit_moments
from cryo_lightning.abinitio.volume_alignment import align_volumes
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.viewing_sh import SHViewingDistribution
from cryo_lightning.physics.volumes import random_molecule

from moments import ctfs_for  # noqa: E402  (benchmarks/ is the script's directory)

ROOT = Path(__file__).resolve().parents[1]


def whitened_residual(model: MomentModel, target: ImageMoments, na: int):
    """``x = (a, b_rest) -> `` whitened ``(M1, M2, M3)`` residual, real, flattened."""
    sc = whitening_scales(target)

    def flat(m1, m2, m3) -> torch.Tensor:
        m1, m2, m3 = whiten_moments(m1, m2, m3, sc)
        r = torch.cat([m1.flatten()] + [m.flatten() for m in m2 + m3])
        return torch.cat([r.real, r.imag])

    t = flat(target.m1, target.m2, target.m3)

    def residual(x: torch.Tensor) -> torch.Tensor:
        return flat(*model.with_third(x[:na], torch.cat([x.new_ones(1), x[na:]]))) - t

    return residual


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--eps", type=float, nargs="+", default=[0.25, 0.5, 0.8, 1.0, 1.3])
    p.add_argument("--iterations", type=int, default=300, help="per stage, basin test")
    p.add_argument("--starts", type=int, default=3)
    p.add_argument("--continue", dest="cont", type=int, default=1000, help="extra iterations per stage")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "moments_landscape")
    args = p.parse_args()
    L, l_max, bandlimit, degree = 32, 4, 0.5, 4
    t_all = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    basis = SphericalFourierBesselBasis(L, l_max=l_max, bandlimit=bandlimit)
    layout = MomentLayout(L, l_max, bandlimit=bandlimit)
    model = MomentModel(basis, layout, degree, ctfs=ctfs_for(L), third=True)
    a = basis.expand(random_molecule(L, g, dtype=torch.float64))
    dist = SHViewingDistribution.random(degree, generator=g)
    m1, m2, m3 = model.with_third(a, dist.coeffs)
    one = torch.ones(2, dtype=torch.float64)
    exact = ImageMoments(m1, m2, one, 0 * one, m3)
    out: dict = {"setting": {"L": L, "l_max": l_max, "bandlimit": bandlimit, "view_degree": degree,
                             "seed": args.seed, "threads": torch.get_num_threads()}}

    out["basin"] = []
    gb = torch.Generator().manual_seed(args.seed + 5)
    for eps in args.eps:
        d = torch.randn(a.shape, generator=gb, dtype=torch.float64)
        res = fit_moments(model, exact, n_starts=1, iterations=(0, 0, args.iterations),
                          init=(a + eps * a.norm() * d / d.norm(), dist.coeffs), whiten=True)
        err = align_volumes(basis, a, res.coeffs).relative_error
        out["basin"].append({"eps": eps, "loss": res.loss, "aligned_rel_err": err, "seconds": res.seconds})
        print(f"basin eps {eps}: loss {res.loss:.2e} err {err:.3f}", flush=True)

    out["random_starts"] = []
    for s in range(args.starts):
        res = fit_moments(model, exact, n_starts=1, iterations=(50, 200, 300), whiten=True,
                          generator=torch.Generator().manual_seed(args.seed + 1 + s))
        err = align_volumes(basis, a, res.coeffs).relative_error
        more = fit_moments(model, exact, n_starts=1, iterations=(0, 0, args.cont),
                           init=(res.coeffs, res.view_coeffs), whiten=True)
        err2 = align_volumes(basis, a, more.coeffs).relative_error
        row = {"start": s, "loss": res.loss, "aligned_rel_err": err, "loss_continued": more.loss,
               "aligned_rel_err_continued": err2, "seconds": res.seconds + more.seconds}
        out["random_starts"].append(row)
        print(f"start {s}: loss {res.loss:.2e} err {err:.3f} -> continued loss {more.loss:.2e} err {err2:.3f}",
              flush=True)

    na = a.numel()
    J = torch.func.jacfwd(whitened_residual(model, exact, na))(torch.cat([a, dist.coeffs[1:]]))
    sv = torch.linalg.svdvals(J)
    sv = sv / sv[0]
    out["conditioning"] = {"unknowns": J.shape[1], "residuals": J.shape[0],
                           "null_dims": int((sv < 1e-10).sum()),
                           "smallest_nonzero": float(sv[sv >= 1e-10].min()),
                           "below": {f"1e-{e}": int(((sv >= 1e-10) & (sv < 10.0 ** -e)).sum()) for e in (3, 2)}}
    out["seconds"] = time.perf_counter() - t_all
    print(out["conditioning"])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2))
    c = out["conditioning"]
    md = [f"# Moment-solver landscape (L = {L}, l_max = {l_max}, band limit {bandlimit}, viewing degree "
          f"{degree}, exact moments with the M3 slice, seed {args.seed})", "",
          f"## Basin of the truth ({args.iterations} iterations per stage, true viewing distribution at the start)", "",
          "| start distance eps | final loss | aligned rel. err. |", "|---|---|---|"]
    md += [f"| {r['eps']} | {r['loss']:.2e} | {r['aligned_rel_err']:.3f} |" for r in out["basin"]]
    md += ["", f"## Random starts, then {args.cont} more iterations per stage", "",
           "| start | loss | aligned rel. err. | loss after | aligned rel. err. after | time (s) |",
           "|---|---|---|---|---|---|"]
    md += [f"| {r['start']} | {r['loss']:.2e} | {r['aligned_rel_err']:.3f} | {r['loss_continued']:.2e} | "
           f"{r['aligned_rel_err_continued']:.3f} | {r['seconds']:.0f} |" for r in out["random_starts"]]
    md += ["", "## Conditioning at the truth (whitened residual)", "",
           f"{c['unknowns']} unknowns, {c['residuals']} residuals: {c['null_dims']} null directions, "
           f"smallest non-zero singular value {c['smallest_nonzero']:.1e} of the largest; "
           f"{c['below']['1e-3']} below 1e-3, {c['below']['1e-2']} below 1e-2.", "",
           f"Total time {out['seconds']:.0f} s on {out['setting']['threads']} threads."]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
