"""Issue 23: the rotational set transformer against every linear set method, the converged U-Net
and the oracle, on held-out molecules of its training distribution.

Test images come from the test split of the transformer config's molecule bank (issue 10's
structure families, each molecule with its own pixel size; CTF, shifts), seeded as in
``benchmarks/denoise.py``: for each SNR and set size ``N``, ``--images`` images from
``--molecules`` molecules, seen by set methods as consecutive sets of ``N``. Methods (rows with
``method``):

- ``transformer``: ``configs/base/denoise_structures_l32.yaml`` + ``configs/denoise_rotational_transformer_cpu.yaml`` (its last checkpoint);
- ``polar``: the earlier polar set model (``configs/denoise_transformer_cpu.yaml``, after its base
  ``configs/base/denoise_synthetic_l32.yaml``; trained on the bead molecules of issue 4, so it is
  off its training distribution here);
- ``unet_converged``: ``configs/base/denoise_structures_l32.yaml`` + ``configs/denoise_unet_converged_cpu.yaml`` (same data as the transformer);
- ``cwf``: covariance Wiener filter with the set's own statistics; ``cwf_prior``: with the polar
  model's population prior; ``cwf_truth``: with the molecule's own noise-free statistics
  (``--reference-images`` clean projections at other poses and shifts, drawn as the test images'
  are): the best linear set estimator;
- ``em``: expectation maximisation over poses and shifts from the set alone, ab initio
  (:mod:`cryo_lightning.abinitio.expectation_maximization`), then the posterior mean of each image
  given its map: the classical 3D-consistent set method;
- ``recon_true_poses``: reconstruction from the set's own images at their *true* poses and shifts,
  low-passed at the best of ``--pose-cutoffs``, then the posterior mean of each image with the
  shift known (a bound for reconstruct-then-project methods);
- ``oracle``: posterior mean given the true volume, over a grid of rotations *and* of the
  simulator's shifts (``--oracle-rotations``; whole-pixel shifts within ``max_shift``): the best
  any method can do, since the images do not tell their shifts either;
- ``oracle_known_shifts``: the same, told each image's shift (a lower bound no method reaches
  when the particles are not centred).

Outputs: ``benchmarks/results/set_denoiser.json`` (rows {method, snr, n, rel_mse, ci95, L, config,
steps}), ``set_denoiser_mse_vs_n.png`` (one panel per SNR) and ``set_denoiser_attention.png``
(what each image draws from the others through the class tokens, against the angle between their
viewing directions, with the share within ``--near-degrees`` against chance).

    python benchmarks/set_denoiser.py                       # after training the configs above
    python benchmarks/set_denoiser.py --merge --skip recon_true_poses oracle cwf_truth   # networks again, reference rows kept
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from denoise import ROOT, _as_sets, evaluate, load, summary, test_sets  # noqa: E402
from denoise_limits import known_pose_posterior  # noqa: E402
from cryo_lightning.abinitio.expectation_maximization import expectation_maximization  # noqa: E402
from cryo_lightning.data.molecule_bank import MoleculeBank  # noqa: E402
from cryo_lightning.data.set_simulator import SetSimulator, SimulationConfig  # noqa: E402
from cryo_lightning.denoise.cwf import cwf_denoise  # noqa: E402
from cryo_lightning.denoise.oracle import fit_scale  # noqa: E402
from cryo_lightning.launch.freeze import resolve_config  # noqa: E402
from cryo_lightning.metrics import relative_mse  # noqa: E402
from cryo_lightning.denoise.population_prior import PopulationPrior  # noqa: E402
from cryo_lightning.physics.steerable_basis import fourier_bessel_basis  # noqa: E402

CONFIGS = {  # each network's configs in the order they compose: its base, then its own file
    "transformer": ["configs/base/denoise_structures_l32.yaml", "configs/denoise_rotational_transformer_cpu.yaml"],
    "polar": ["configs/base/denoise_synthetic_l32.yaml", "configs/denoise_transformer_cpu.yaml"],
    "unet_converged": ["configs/base/denoise_structures_l32.yaml", "configs/denoise_unet_converged_cpu.yaml"],
}


def fit_command(configs: list[str]) -> str:
    """The command that trains a network, from the repository root (as the rows record it)."""
    return "cryol fit " + " ".join(f"--config {c}" for c in configs)


def checkpoint(configs: list[str]) -> Path:
    """The ``last.ckpt`` in the run folder (``trainer.default_root_dir``, which every
    experiment's own file, the last one, sets)."""
    root = yaml.safe_load((ROOT / configs[-1]).read_text())["trainer"]["default_root_dir"]
    return ROOT / root / "checkpoints" / "last.ckpt"


def trained_steps(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def attention_figure(net, batch: dict, n: int, near_degrees: float, path: Path) -> dict:
    """Neighbour weights of the transformer against viewing-direction angles; returns the shares."""
    sets = {k: _as_sets(batch[k], n) for k in ("noisy", "ctf", "rotations")}
    variance = batch["noise_variance"].expand(sets["noisy"].shape[0])
    weights = net.neighbour_weights(sets["noisy"], sets["ctf"], variance).double()  # (S, n, n)
    v = sets["rotations"][..., 2, :].double()
    cosine = (v[:, :, None] * v[:, None]).sum(-1).clamp(-1, 1)
    angle = torch.rad2deg(torch.arccos(cosine))
    off = ~torch.eye(n, dtype=torch.bool)[None].expand_as(weights)
    near = (angle < near_degrees) & off
    share = float((weights * near).sum(-1).mean() / (weights * off).sum(-1).mean())
    chance = float(near.double().sum(-1).mean() / (n - 1))
    bins = np.linspace(0, 180, 19)
    a, w = angle[off].numpy(), weights[off].numpy()
    index = np.clip(np.digitize(a, bins) - 1, 0, len(bins) - 2)
    mean_w = np.array([w[index == k].mean() if (index == k).any() else np.nan for k in range(len(bins) - 1)])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].imshow(weights[0].numpy(), cmap="viridis")
    axes[0].set_title(f"weights of one set (N = {n})")
    axes[0].set_xlabel("image j")
    axes[0].set_ylabel("image i")
    axes[1].plot(0.5 * (bins[1:] + bins[:-1]), mean_w * (n - 1), marker="o")
    axes[1].axhline(1.0, color="grey", lw=0.8, ls="--", label="uniform")
    axes[1].set_xlabel("angle between viewing directions (deg)")
    axes[1].set_ylabel("mean weight x (N - 1)")
    axes[1].set_title(f"within {near_degrees:g} deg: {share:.1%} of the weight, {chance:.1%} by chance")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"near_degrees": near_degrees, "share_near": share, "chance": chance}


def plot(rows: list[dict], path: Path) -> None:
    snrs = sorted({r["snr"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(snrs), figsize=(4.5 * len(snrs), 4), squeeze=False)
    for ax, snr in zip(axes[0], snrs):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["n"], r["rel_mse"], r["ci95"]) for r in rows if r["snr"] == snr and r["method"] == method)
            if pts:
                n, m, ci = map(np.array, zip(*pts))
                ax.errorbar(n, m, yerr=ci, marker="o", capsize=2, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("set size N")
        ax.set_title(f"SNR 1/{1 / snr:.0f}")
    axes[0][0].set_ylabel("relative MSE")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shift_marginal_oracle(batch: dict, bank: MoleculeBank, config: SimulationConfig, rotations: int) -> torch.Tensor:
    """Relative MSE ``(n,)`` of the posterior mean given the true volume (at the exact oracle's scale),
    over rotations and the simulator's range of shifts: EM's E-step with the truth as its map."""
    volumes = bank.batch(batch["molecule"].tolist(), batch["noisy"].device)
    scale = fit_scale(batch["clean"], volumes, batch["rotations"], batch["ctf"], batch["origins"],
                      config.oversampling, config.interpolation)
    found = expectation_maximization(batch["noisy"], batch["ctf"], batch["noise_variance"],
                                     initial=volumes * scale[:, None, None, None], iterations=0, n_rotations=rotations,
                                     max_shift=config.max_shift, initial_shell=bank.box // 2)
    return relative_mse(found.denoised, batch["clean"]).flatten().cpu()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--snrs", type=float, nargs="+", default=[1 / 16, 1 / 32, 1 / 50])
    p.add_argument("--ns", type=int, nargs="+", default=[8, 32, 128, 512])
    p.add_argument("--images", type=int, default=1024, help="test images per (SNR, N) cell")
    p.add_argument("--molecules", type=int, default=8)
    p.add_argument("--reference-images", type=int, default=4096)
    p.add_argument("--oracle-rotations", type=int, default=16384)
    p.add_argument("--pose-cutoffs", type=float, nargs="+", default=[0.15, 0.2, 0.25])
    p.add_argument("--pose-lambda", type=float, default=0.1)
    p.add_argument("--near-degrees", type=float, default=15.0)
    p.add_argument("--attention-snr", type=float, default=0.25, help="SNR of the attention figure")
    p.add_argument("--em-iterations", type=int, default=15)
    p.add_argument("--em-rotations", type=int, default=4608, help="rotation grid of EM and of the oracle over shifts")
    p.add_argument("--skip", nargs="*", default=[], help="methods to leave out (e.g. recon_true_poses oracle)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "set_denoiser")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of an existing OUT.json that this run does not recompute (e.g. the "
                        "reference rows, measured once, beside a network trained further)")
    args = p.parse_args()
    device = torch.device("cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    data_cfg = resolve_config(["fit", *(a for c in CONFIGS["transformer"] for a in ("--config", str(ROOT / c)))])
    data_cfg = data_cfg["data"]["init_args"]
    L = int(data_cfg["box"])
    sim_cfg = SimulationConfig(**{**data_cfg["simulation"], "snr": tuple(data_cfg["simulation"]["snr"])})
    bank = MoleculeBank(L, "test", int(data_cfg["n_test_molecules"]), int(data_cfg["seed"]),
                        family=data_cfg.get("molecules", "beads"), pixel_size_range=data_cfg.get("pixel_size_range"),
                        diameter=tuple(data_cfg.get("diameter", (0.3, 0.95))))
    nets, steps = {}, {}
    for name, config in CONFIGS.items():
        ckpt = checkpoint(config)
        if name in args.skip:
            continue
        if not ckpt.is_file():
            print(f"{name}: {ckpt} not found ({fit_command(config)}); left out")
            continue
        nets[name], steps[name] = load(ckpt, device), trained_steps(ckpt)
    basis = fourier_bessel_basis(L, device)
    reference = SetSimulator(bank, SimulationConfig(**{**sim_cfg.__dict__, "set_size": args.reference_images,
                                                       "ctf": False, "snr": (1.0, 1.0)}))
    polar = nets["polar"].net if "polar" in nets else None

    def network(task):
        return lambda b: task(b["noisy"], b["ctf"], b["noise_variance"])

    rows = []
    kept = json.loads(args.out.with_suffix(".json").read_text()) if args.merge and args.out.with_suffix(".json").is_file() else []
    merged_rows = kept
    for snr in args.snrs:
        for n in args.ns:
            t0 = time.perf_counter()
            errors: dict[str, list] = {}
            for batch in test_sets(bank, sim_cfg, snr, n, args.images, args.molecules, device):
                molecule = int(batch["molecule"][0])
                methods = {name: network(task) for name, task in nets.items()}
                if n >= 8:
                    methods["cwf"] = lambda b: cwf_denoise(b["noisy"], b["ctf"], b["noise_variance"])
                    if polar is not None and getattr(polar, "cwf_prior_strength", 0) > 0:
                        methods["cwf_prior"] = lambda b: cwf_denoise(
                            b["noisy"], b["ctf"], b["noise_variance"], prior=polar.population_prior(),
                            prior_strength=polar.cwf_prior_strength, prior_tempering=polar.cwf_prior_tempering)
                    if "cwf_truth" not in args.skip:
                        clean = reference(torch.tensor([10_000 + molecule]), torch.tensor([molecule]))["clean"][0]
                        own = PopulationPrior.fit([(clean, None)], basis)
                        methods["cwf_truth"] = lambda b, own=own: cwf_denoise(
                            b["noisy"], b["ctf"], b["noise_variance"], prior=own, prior_strength=1e12)
                if "oracle_known_shifts" not in args.skip:
                    methods["oracle"] = "oracle"  # evaluate()'s oracle is told the shifts: renamed below
                if n >= 32 and "em" not in args.skip:  # below, half sets of a few images make no map
                    methods["em"] = lambda b: expectation_maximization(
                        b["noisy"], b["ctf"], b["noise_variance"], iterations=args.em_iterations,
                        n_rotations=args.em_rotations, max_shift=sim_cfg.max_shift,
                        generator=torch.Generator().manual_seed(molecule)).denoised
                with torch.no_grad():
                    for name, values in evaluate(methods, [batch], n, bank, sim_cfg, args.oracle_rotations).items():
                        name = "oracle_known_shifts" if name == "oracle" else name
                        errors.setdefault(name, []).append(torch.as_tensor(values))
                    if "oracle" not in args.skip:
                        errors.setdefault("oracle", []).append(shift_marginal_oracle(batch, bank, sim_cfg, args.em_rotations))
                if "recon_true_poses" not in args.skip:
                    sets = {k: _as_sets(batch[k], n) for k in ("noisy", "ctf", "clean", "rotations", "origins")}
                    variance = batch["noise_variance"].expand(sets["noisy"].shape[0])
                    found = known_pose_posterior(sets, variance, args.pose_cutoffs, args.pose_lambda,
                                                 args.oracle_rotations, sim_cfg.interpolation)
                    for name, values in found.items():
                        errors.setdefault(name, []).append(values.detach())
            merged = {k: torch.cat(v).numpy() for k, v in errors.items()}
            recon = {k: v for k, v in merged.items() if k.startswith("recon(")}
            if recon:  # the best cutoff is the bound
                best = min(recon, key=lambda k: recon[k].mean())
                merged = {k: v for k, v in merged.items() if k not in recon}
                merged["recon_true_poses"] = recon[best]
            for method, values in merged.items():
                mean, ci = summary(values)
                rows.append({"method": method, "snr": snr, "n": n, "rel_mse": mean, "ci95": ci, "L": L,
                             "config": fit_command(CONFIGS[method]) if method in CONFIGS else None, "steps": steps.get(method), "images": int(len(values))})
            print(f"SNR 1/{1 / snr:.0f} N={n}: " + ", ".join(f"{m} {v.mean():.3f}" for m, v in merged.items())
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
            fresh = {(r["method"], r["snr"], r["n"]) for r in rows}
            merged_rows = [r for r in kept if (r["method"], r["snr"], r["n"]) not in fresh] + rows
            args.out.with_suffix(".json").write_text(json.dumps(merged_rows, indent=2))
    plot(merged_rows, args.out.with_name(args.out.name + "_mse_vs_n.png"))
    if "transformer" in nets:
        n = 128 if 128 in args.ns else max(args.ns)
        batch = test_sets(bank, sim_cfg, args.attention_snr, n, n * 4, 4, device)[0]
        with torch.no_grad():
            shares = attention_figure(nets["transformer"].net, batch, n, args.near_degrees,
                                      args.out.with_name(args.out.name + "_attention.png"))
        print(f"attention at SNR 1/{1 / args.attention_snr:.0f}, N = {n}: {shares['share_near']:.1%} of the weight "
              f"within {args.near_degrees:g} deg ({shares['chance']:.1%} by chance)")
        args.out.with_name(args.out.name + "_attention.json").write_text(
            json.dumps({"snr": args.attention_snr, "n": n, **shares}, indent=2))


if __name__ == "__main__":
    main()
