"""How far a set denoiser can get from second-order statistics and from pairwise attention.

At low SNR and moderate set size the set transformer's edge over single-image networks comes from
its covariance-Wiener guide. This script measures the two limits behind that, on the held-out
molecules of ``benchmarks/denoise.py`` (same seeds, same images):

1. Second-order statistics. Relative MSE of the covariance Wiener filter (CWF) with the set's own
   statistics (classical), with the transformer's population prior ("cwf+prior"), and with the
   molecule's *own* noise-free statistics ("cwf+truth": mean and covariance of
   ``--reference-images`` clean CTF-free projections of the test molecule at other poses, scaled
   to the set's estimated power). The last is what a perfect covariance estimate would give: the
   best any linear (Gaussian) set method can do. Next to them: the transformer and the oracle
   posterior mean (knows the volume).
2. Pairwise attention. The transformer's first layer (:meth:`PolarSetTransformer.neighbour_weights`):
   the attention mass each image puts on images whose viewing direction is within
   ``--near-degrees``, with the layer's own queries (the guide) and with the clean images as
   queries, against the fraction of such images (what attention at random would give).
3. 3D consistency. The other route for a set: reconstruct the molecule from the set and take the
   posterior mean of each image given that volume (as the oracle does with the true one). Its
   bound here uses the images' *true* poses ("recon(true poses)"): least-squares CG
   reconstruction from the set's own noisy images, low-passed at ``--pose-cutoffs`` (cycles per
   pixel), then the posterior mean. Any method that must find the poses (EM, ab initio) does
   worse, so where this row is above the target no reconstruct-then-project method meets it.

    python benchmarks/denoise_limits.py --snr 0.03125 --n 128     # after benchmarks/denoise.py
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from denoise import ROOT, _as_sets, evaluate, fit_command, load, resolved_config, summary, test_sets
from cryo_lightning.abinitio.least_squares_reconstruction import reconstruct
from cryo_lightning.data.molecule_bank import MoleculeBank
from cryo_lightning.data.set_simulator import SetSimulator, SimulationConfig
from cryo_lightning.denoise.cwf import cwf_denoise
from cryo_lightning.denoise.oracle import oracle_denoise
from cryo_lightning.denoise.population_prior import PopulationPrior
from cryo_lightning.metrics import relative_mse
from cryo_lightning.physics.fourier import fft3c, ifft3c, radial_grid
from cryo_lightning.physics.steerable_basis import fourier_bessel_basis


def low_pass(volume: torch.Tensor, cutoff: float) -> torch.Tensor:
    """``(L, L, L)`` volume with every Fourier component above ``cutoff`` (cycles/pixel) removed."""
    L = volume.shape[-1]
    keep = radial_grid(L, 3, volume.device, volume.dtype) / L <= cutoff
    return ifft3c(fft3c(volume) * keep).real


def known_pose_posterior(sets: dict, variance: torch.Tensor, cutoffs: list[float], lam: float,
                         rotations: int, interpolation: str) -> dict[str, torch.Tensor]:
    """Relative MSE ``{row: (B * N,)}`` of the posterior mean given each set's own reconstruction
    from its true poses (rotations, and the origins when ``sets`` holds them), low-passed at each
    cutoff."""
    origins = sets.get("origins")
    volumes = [reconstruct(y, R, c, None if origins is None else origins[b], lam=lam, iterations=30,
                           interpolation=interpolation).volume
               for b, (y, R, c) in enumerate(zip(sets["noisy"], sets["rotations"], sets["ctf"]))]
    out = {}
    for cutoff in cutoffs:
        estimate = torch.stack([low_pass(v, cutoff) for v in volumes])
        images = oracle_denoise(sets["noisy"], sets["ctf"], variance, estimate, scale=None, n_rotations=rotations,
                                origins=origins, interpolation=interpolation)
        out[f"recon(true poses, {cutoff:g})+posterior"] = relative_mse(images, sets["clean"]).flatten()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--snr", type=float, default=1 / 32)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--molecules", type=int, default=8)
    p.add_argument("--reference-images", type=int, default=4096)
    p.add_argument("--near-degrees", type=float, default=15.0)
    p.add_argument("--oracle-rotations", type=int, default=16384)
    p.add_argument("--pose-cutoffs", type=float, nargs="+", default=[0.15, 0.2, 0.25],
                   help="low-pass cutoffs (cycles/pixel) of the known-pose reconstructions")
    p.add_argument("--pose-lambda", type=float, default=0.1, help="Tikhonov weight of those reconstructions")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "denoise_limits_cpu")
    args = p.parse_args()
    device = torch.device("cpu")
    config, command = resolved_config("transformer", "cpu"), fit_command("transformer", "cpu")
    data_cfg = config["data"]["init_args"]
    ckpt = ROOT / config["trainer"]["default_root_dir"] / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise SystemExit(f"{ckpt} is missing: train it first (python benchmarks/denoise.py --setting cpu)")
    net = load(ckpt, device).net
    L = int(data_cfg["box"])
    sim_cfg = SimulationConfig(**{**data_cfg["simulation"], "snr": tuple(data_cfg["simulation"]["snr"])})
    bank = MoleculeBank(L, "test", int(data_cfg["n_test_molecules"]), int(data_cfg["seed"]))
    batches = test_sets(bank, sim_cfg, args.snr, args.n, args.images, args.molecules, device)
    basis = fourier_bessel_basis(L, device)
    reference = SetSimulator(bank, SimulationConfig(**{**sim_cfg.__dict__, "set_size": args.reference_images,
                                                       "ctf": False, "snr": (1.0, 1.0)}))

    def truth_prior(molecule: int) -> PopulationPrior:
        seed = torch.tensor([10_000 + molecule])  # other poses than the test images
        clean = reference(seed, torch.tensor([molecule]), device=device)["clean"][0]
        return PopulationPrior.fit([(clean, None)], basis)

    rows, near_mass = {}, {"guide": [], "clean": [], "random": []}
    for batch in batches:
        molecule = int(batch["molecule"][0])
        own = truth_prior(molecule)
        methods = {
            "cwf": lambda b: cwf_denoise(b["noisy"], b["ctf"], b["noise_variance"]),
            "cwf+prior": lambda b: cwf_denoise(b["noisy"], b["ctf"], b["noise_variance"], prior=net.population_prior(),
                                               prior_strength=net.cwf_prior_strength,
                                               prior_tempering=net.cwf_prior_tempering),
            # an overwhelming strength: the molecule's own statistics, scaled to the set's power
            "cwf+truth": lambda b: cwf_denoise(b["noisy"], b["ctf"], b["noise_variance"], prior=own,
                                               prior_strength=1e12),
            "transformer": lambda b: net(b["noisy"], b["ctf"], b["noise_variance"]),
            "oracle": "oracle",
        }
        with torch.no_grad():
            errors = evaluate(methods, [batch], args.n, bank, sim_cfg, args.oracle_rotations)
        for name, values in errors.items():
            rows.setdefault(name, []).append(torch.as_tensor(values))
        sets = {k: _as_sets(batch[k], args.n) for k in ("noisy", "ctf", "clean", "rotations")}
        variance = batch["noise_variance"].expand(sets["noisy"].shape[0])
        for name, values in known_pose_posterior(sets, variance, args.pose_cutoffs, args.pose_lambda,
                                                 args.oracle_rotations, sim_cfg.interpolation).items():
            rows.setdefault(name, []).append(values.detach())
        v = sets["rotations"][..., 2, :]  # viewing directions
        near = ((v[:, :, None] * v[:, None]).sum(-1) > math.cos(math.radians(args.near_degrees))).double()
        near = near - torch.eye(args.n, dtype=near.dtype)
        for name, queries in (("guide", None), ("clean", sets["clean"])):
            w = net.neighbour_weights(sets["noisy"], sets["ctf"], variance, queries=queries).double()
            near_mass[name].append((w * near).sum(-1).flatten())
        near_mass["random"].append((near.sum(-1) / (args.n - 1)).flatten())
        print(f"molecule {molecule}: " + ", ".join(f"{k} {float(v[-1].mean()):.3f}" for k, v in rows.items()), flush=True)

    out = {"snr": args.snr, "n": args.n, "L": L, "images": args.images, "config": command,
           "near_degrees": args.near_degrees, "rel_mse": {}, "attention_mass_near": {}}
    lines = [f"SNR 1/{1 / args.snr:.0f}, N = {args.n}, L = {L}, {args.images} test images "
             f"({args.molecules} held-out molecules), {command}.", "",
             "| method | relative MSE |", "|---|---|"]
    for name, parts in rows.items():
        mean, ci = summary(torch.cat(parts).numpy())
        out["rel_mse"][name] = {"mean": mean, "ci95": ci}
        lines.append(f"| {name} | {mean:.3f} +- {ci:.3f} |")
    lines += ["", f"Attention mass of the first layer on images within {args.near_degrees:g} degrees:", "",
              "| queries | mass |", "|---|---|"]
    for name, parts in near_mass.items():
        value = float(torch.cat(parts).mean())
        out["attention_mass_near"][name] = value
        lines.append(f"| {name if name != 'random' else 'random (fraction of such images)'} | {value:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
