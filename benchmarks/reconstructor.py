"""Learned moment reconstructor vs the classical solver, CPU-sized and from exact moments (preliminary).

Setting: L = 16, SFB ``l_max = 2``, band limit 0.5 (63 coefficients), viewing degree 2, no CTF,
exact M1, M2 and M3 slice of procedural molecules (``random_molecule``; training seeds
``1000 i + j``, held-out seeds from 10^7) under random non-uniform viewing distributions
(``SHViewingDistribution.random``). Both methods start from the same random start (white
coefficients scaled to the target's ``tr M2``, uniform viewing distribution).

- Learned: :class:`~cryo_lightning.models.reconstructor.MomentReconstructor` (``--unroll``
  steps, ``--channels`` per degree), trained here with Adam on the O(3)-aligned relative volume
  error plus 0.1 x the moment loss of the output, ``--steps`` batches of ``--batch`` molecules
  (the loss of ``tasks/reconstruct.py``; ``configs/reconstructor_cpu.yaml`` trains the same network).
- Classical: ``fit_moments`` with stages (50, 200, 300) and the whitened stage, one start.

Reported: aligned relative coefficient error and time per reconstruction on held-out molecules.

    python benchmarks/reconstructor.py       # writes benchmarks/results/reconstructor.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from cryo_lightning.abinitio.mom import fit_moments, moment_loss
from cryo_lightning.abinitio.moment_model import MomentModel
from cryo_lightning.abinitio.moments import ImageMoments, MomentLayout
from cryo_lightning.abinitio.volume_alignment import align_volumes
from cryo_lightning.models.reconstructor import MomentReconstructor
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.viewing_sh import SHViewingDistribution
from cryo_lightning.physics.volumes import random_molecule

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600, help="training batches")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--unroll", type=int, default=8)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--held-out", type=int, default=6)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reconstructor")
    args = p.parse_args()
    L, l_max, bandlimit, degree = 16, 2, 0.5, 2
    torch.manual_seed(0)
    basis = SphericalFourierBesselBasis(L, l_max=l_max, bandlimit=bandlimit)
    model = MomentModel(basis, MomentLayout(L, l_max, bandlimit=bandlimit), degree, third=True)
    one = torch.ones(1, dtype=torch.float64)

    def trace(m2: list[torch.Tensor]) -> float:
        return float(sum(torch.diagonal(t, dim1=-2, dim2=-1).real.sum() for t in m2))

    def example(seed: int):
        g = torch.Generator().manual_seed(seed)
        a = basis.expand(random_molecule(L, g, dtype=torch.float64))
        b = SHViewingDistribution.random(degree, generator=g).coeffs
        with torch.no_grad():
            m1, m2, m3 = model.with_third(a, b)
            a0 = torch.randn(a.numel(), generator=g, dtype=torch.float64)
            b0 = torch.zeros_like(b)
            b0[0] = 1.0
            a0 = a0 * math.sqrt(trace(m2) / trace(model(a0, b0)[1]))
        return a, b, ImageMoments(m1, m2, one, 0 * one, m3), a0, b0

    net = MomentReconstructor(basis.layout.irreps(), degree, steps=args.unroll, channels=args.channels).double()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    curve = []
    for it in range(args.steps):
        total, errs = 0.0, []
        for j in range(args.batch):
            a, _, target, a0, b0 = example(1000 * it + j)

            def loss_fn(x, y, t=target):
                return moment_loss(model, x, y, t, use_m3=True)

            out, b_out = net(a0[None], b0[None], loss_fn)
            truth = align_volumes(basis, out[0].detach(), a, n_grid=1000).aligned  # truth in the output's frame
            err = (out[0] - truth).norm() / a.norm()
            total = total + err**2 + 0.1 * loss_fn(out[0], b_out[0])
            errs.append(float(err.detach()))
        opt.zero_grad()
        (total / args.batch).backward()
        opt.step()
        curve.append(statistics.mean(errs))
        if it % 50 == 0:
            print(f"step {it}: train error {curve[-1]:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - t0

    rows = []
    for s in range(args.held_out):
        a, _, target, a0, b0 = example(10**7 + s)

        def loss_fn(x, y, t=target):
            return moment_loss(model, x, y, t, use_m3=True)

        t1 = time.perf_counter()
        out, _ = net(a0[None], b0[None], loss_fn)
        t_net = time.perf_counter() - t1
        res = fit_moments(model, target, n_starts=1, iterations=(50, 200, 300), whiten=True, init=(a0, b0))
        row = {"molecule": s, "start_err": align_volumes(basis, a, a0).relative_error,
               "learned_err": align_volumes(basis, a, out[0].detach()).relative_error, "learned_s": t_net,
               "classical_err": align_volumes(basis, a, res.coeffs).relative_error, "classical_s": res.seconds}
        rows.append(row)
        print(row, flush=True)

    out = {"setting": {"L": L, "l_max": l_max, "bandlimit": bandlimit, "view_degree": degree, **vars(args),
                       "out": str(args.out), "threads": torch.get_num_threads()},
           "train_seconds": train_seconds, "train_curve": curve, "held_out": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2))
    med = {k: statistics.median(r[k] for r in rows) for k in ("start_err", "learned_err", "learned_s",
                                                             "classical_err", "classical_s")}
    md = [f"# Learned vs classical moment reconstruction (L = {L}, l_max = {l_max}, viewing degree {degree}, "
          "exact moments with the M3 slice, preliminary)", "",
          f"Training: {args.steps} batches of {args.batch} molecules, {args.unroll} unrolled steps, "
          f"{args.channels} channels per degree, {train_seconds:.0f} s on {torch.get_num_threads()} threads; "
          f"mean training error of the last 50 batches {statistics.mean(curve[-50:]):.3f}.", "",
          "| held-out molecule | start error | learned error | learned time (s) | classical error | classical time (s) |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['molecule']} | {r['start_err']:.3f} | {r['learned_err']:.3f} | {r['learned_s']:.2f} | "
           f"{r['classical_err']:.3f} | {r['classical_s']:.1f} |" for r in rows]
    md += [f"| median | {med['start_err']:.3f} | {med['learned_err']:.3f} | {med['learned_s']:.2f} | "
           f"{med['classical_err']:.3f} | {med['classical_s']:.1f} |"]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
