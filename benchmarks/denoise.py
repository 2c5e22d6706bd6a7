"""Denoising benchmark: every method x SNR x set size on held-out molecules.

1. Trains each network config (``configs/denoise_{dncnn,unet,transformer}[_cpu].yaml``, after the
   setting's base ``configs/base/denoise_synthetic_l{64,32}.yaml``: the same budget of steps x sets
   x images on the same training molecules) with ``cryol fit``, unless its checkpoint exists
   (``--retrain`` forces it).
2. For every SNR and set size N, simulates test sets of N images from the *test* molecule bank
   (disjoint from training; one batch of images per molecule, seen by set methods as consecutive
   sets of N), and runs on identical images: the noisy input, the radial Wiener
   filter, the covariance Wiener filter (CWF, statistics from the same N images; N >= 8), the
   oracle posterior mean (knows the volume and the amplitude scale), each trained network, and,
   when the transformer has one, its CWF guide with the population prior alone ("cwf+prior").
3. Writes ``benchmarks/results/denoise[_cpu].json`` (a list of {method, snr, n, rel_mse, ci95, L,
   config: the ``cryol fit`` command of the network}), a Markdown table, a figure of relative MSE
   vs SNR and an image gallery.

    python benchmarks/denoise.py --setting cpu            # L = 32 on a CPU
    python benchmarks/denoise.py --setting gpu            # L = 64 on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from cryo_lightning.cli import main as cryol
from cryo_lightning.data.molecule_bank import MoleculeBank, derive_seed
from cryo_lightning.data.set_simulator import SetSimulator, SimulationConfig
from cryo_lightning.denoise.cwf import cwf_denoise
from cryo_lightning.denoise.oracle import fit_scale, oracle_denoise
from cryo_lightning.denoise.wiener import wiener_denoise
from cryo_lightning.launch.freeze import resolve_config
from cryo_lightning.metrics import relative_mse
from cryo_lightning.tasks.denoise import DenoiseTask

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = ("dncnn", "unet", "transformer")
SNRS = (1 / 4, 1 / 16, 1 / 32, 1 / 50, 1 / 100)
SET_SIZES = (1, 8, 32, 128, 512)
BASES = {"cpu": "denoise_synthetic_l32", "gpu": "denoise_synthetic_l64"}  # what every network shares


def config_paths(network: str, setting: str) -> list[Path]:
    """A network's configs in the order they compose: the setting's base, then the network's own."""
    return [ROOT / "configs" / "base" / f"{BASES[setting]}.yaml",
            ROOT / "configs" / f"denoise_{network}{'_cpu' if setting == 'cpu' else ''}.yaml"]


def config_args(network: str, setting: str) -> list[str]:
    return [arg for path in config_paths(network, setting) for arg in ("--config", str(path))]


def fit_command(network: str, setting: str) -> str:
    """The command that trains a network, from the repository root (as the results record it)."""
    return "cryol fit " + " ".join(f"--config {p.relative_to(ROOT)}" for p in config_paths(network, setting))


def resolved_config(network: str, setting: str) -> dict:
    """A network's fully resolved config (what ``cryol fit ... --print_config`` prints)."""
    return resolve_config(["fit", *config_args(network, setting)])


def train(network: str, setting: str, retrain: bool, max_steps: int | None) -> Path:
    """Train one network with its config (from the repository root); return the checkpoint."""
    root = resolved_config(network, setting)["trainer"]["default_root_dir"]
    overrides = []
    if max_steps:  # another budget: its own run folder, so the config's checkpoint stays as it is
        root = f"{root}_steps{max_steps}"
        overrides = ["--trainer.max_steps", str(max_steps), "--trainer.default_root_dir", root,
                     "--trainer.logger.init_args.save_dir", root,
                     "--trainer.callbacks.init_args.dirpath", f"{root}/checkpoints"]
    ckpt = ROOT / root / "checkpoints" / "last.ckpt"
    if ckpt.is_file() and not retrain:
        return ckpt
    t0 = time.perf_counter()
    cryol(["fit", *config_args(network, setting), *overrides])
    print(f"trained {network} in {time.perf_counter() - t0:.0f} s -> {ckpt}")
    return ckpt


def load(ckpt: Path, device: torch.device) -> DenoiseTask:
    task = DenoiseTask.load_from_checkpoint(ckpt, map_location=device)
    return task.eval()


def test_sets(bank: MoleculeBank, config: SimulationConfig, snr: float, n: int, images: int, molecules: int,
              device) -> list[dict]:
    """Held-out images at ``snr``: one batch per molecule of ``max(n, images // molecules)`` images
    (a multiple of ``n``), seeded; set methods see them as consecutive sets of ``n``."""
    per = max(n, images // molecules // n * n)
    sim = SetSimulator(bank, SimulationConfig(**{**config.__dict__, "set_size": per, "snr": (snr, snr)}))
    out = []
    for k in range(max(1, min(molecules, images // per))):
        seed = derive_seed(7, int(round(1 / snr)), k)
        out.append(sim(torch.tensor([seed], device=device), torch.tensor([k % len(bank)], device=device),
                       device=device))
    return out


def _as_sets(x: torch.Tensor, n: int) -> torch.Tensor:
    """``(1, M, ...)`` -> ``(M / n, n, ...)``."""
    return x.reshape(-1, n, *x.shape[2:])


def evaluate(methods: dict, batches: list[dict], n: int, bank: MoleculeBank, config: SimulationConfig,
             oracle_rotations: int) -> dict[str, np.ndarray]:
    """Relative MSE of every image for every method: ``{method: (n_images,)}``."""
    errors: dict[str, list] = {name: [] for name in methods}
    for batch in batches:
        sets = {k: _as_sets(batch[k], n) for k in ("noisy", "ctf", "clean")}
        sets["noise_variance"] = batch["noise_variance"].expand(sets["noisy"].shape[0])
        for name, fn in methods.items():
            if fn is None:
                continue
            if name == "oracle":  # one projection pass per molecule: the whole batch at once
                volumes = bank.batch(batch["molecule"].tolist(), batch["noisy"].device)
                scale = fit_scale(batch["clean"], volumes, batch["rotations"], batch["ctf"], batch["origins"],
                                  config.oversampling, config.interpolation)
                out = oracle_denoise(batch["noisy"], batch["ctf"], batch["noise_variance"], volumes, scale=scale,
                                     n_rotations=oracle_rotations, origins=batch["origins"],
                                     interpolation=config.interpolation)
                errors[name].append(relative_mse(out, batch["clean"]).flatten().cpu())
            else:
                errors[name].append(relative_mse(fn(sets), sets["clean"]).flatten().cpu())
    return {k: torch.cat(v).numpy() for k, v in errors.items() if v}


def summary(values: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the 95% interval of the mean (normal approximation)."""
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--max-steps", type=int, default=None, help="override the configs' budget (trained into <run folder>_steps<N>)")
    p.add_argument("--snrs", type=float, nargs="+", default=list(SNRS))
    p.add_argument("--ns", type=int, nargs="+", default=list(SET_SIZES))
    p.add_argument("--images", type=int, default=512, help="test images per (SNR, N) cell")
    p.add_argument("--molecules", type=int, default=8, help="held-out molecules the images come from")
    p.add_argument("--oracle-rotations", type=int, default=32768)
    p.add_argument("--networks", nargs="+", default=list(NETWORKS))
    p.add_argument("--out", type=Path, default=None, help="results stem (default benchmarks/results/denoise[_cpu])")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and args.setting == "gpu" else "cpu")
    stem = args.out or ROOT / "benchmarks" / "results" / f"denoise{'_cpu' if args.setting == 'cpu' else ''}"
    stem.parent.mkdir(parents=True, exist_ok=True)

    nets = {name: load(train(name, args.setting, args.retrain, args.max_steps), device) for name in args.networks}
    data_cfg = resolved_config(args.networks[0], args.setting)["data"]["init_args"]
    L = int(data_cfg["box"])
    sim_cfg = SimulationConfig(**{**data_cfg["simulation"], "snr": tuple(data_cfg["simulation"]["snr"])})
    bank = MoleculeBank(L, "test", int(data_cfg["n_test_molecules"]), int(data_cfg["seed"]))

    def network(task: DenoiseTask):
        @torch.no_grad()
        def run(batch: dict) -> torch.Tensor:
            return task(batch["noisy"], batch["ctf"], batch["noise_variance"])
        return run

    methods = {
        "noisy": lambda b: b["noisy"],
        "wiener": lambda b: wiener_denoise(b["noisy"], b["ctf"], b["noise_variance"]),
        "cwf": lambda b: cwf_denoise(b["noisy"], b["ctf"], b["noise_variance"]),
        "oracle": "oracle",
        **{name: network(task) for name, task in nets.items()},
    }
    # The transformer's CWF guide with its population prior (fitted to the training molecules), on
    # its own: how much of the transformer's gain the prior explains.
    set_net = nets["transformer"].net if "transformer" in nets else None
    if getattr(set_net, "cwf_prior_strength", 0) > 0:
        prior = set_net.population_prior(device)
        methods["cwf+prior"] = lambda b: cwf_denoise(b["noisy"], b["ctf"], b["noise_variance"], prior=prior,
                                                     prior_strength=set_net.cwf_prior_strength,
                                                     prior_tempering=set_net.cwf_prior_tempering)
    rows, gallery = [], None
    for snr in args.snrs:
        for n in args.ns:
            batches = test_sets(bank, sim_cfg, snr, n, args.images, args.molecules, device)
            active = {k: (None if k.startswith("cwf") and n < 8 else v) for k, v in methods.items()}
            t0 = time.perf_counter()
            errors = evaluate(active, batches, n, bank, sim_cfg, args.oracle_rotations)
            for method, values in errors.items():
                mean, ci = summary(values)
                owner = "transformer" if method == "cwf+prior" else method  # the prior is the transformer's
                config = fit_command(owner, args.setting) if owner in nets else None
                rows.append({"method": method, "snr": snr, "n": n, "rel_mse": mean, "ci95": ci, "L": L,
                             "config": config, "images": int(len(values))})
            print(f"SNR 1/{1 / snr:.0f} N={n}: " + ", ".join(f"{m} {errors[m].mean():.3f}" for m in errors)
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
            if gallery is None and n == max(args.ns) and snr == min(args.snrs, key=lambda s: abs(s - 1 / 32)):
                first = {k: _as_sets(batches[0][k], n) for k in ("noisy", "ctf", "clean")}
                first["noise_variance"] = batches[0]["noise_variance"].expand(first["noisy"].shape[0])
                gallery = (first, {k: v for k, v in active.items() if v not in (None, "oracle")})
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    write_table(rows, stem.with_suffix(".md"), args, device)
    plot(rows, stem.with_name(stem.name + "_mse_vs_snr.png"))
    if gallery is not None:
        plot_gallery(*gallery, stem.with_name(stem.name + "_gallery.png"))


def write_table(rows: list[dict], path: Path, args, device) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"Relative MSE (mean +- 95% interval) on held-out molecules, L = {rows[0]['L']}, "
             f"{args.images} images per cell, device {device}, torch {torch.__version__}.", ""]
    header = "| SNR | N | " + " | ".join(methods) + " |"
    lines += [header, "|" + "---|" * (len(methods) + 2)]
    for snr in args.snrs:
        for n in args.ns:
            cells = []
            for m in methods:
                r = next((r for r in rows if r["method"] == m and r["snr"] == snr and r["n"] == n), None)
                cells.append(f"{r['rel_mse']:.3f} +- {r['ci95']:.3f}" if r else "-")
            lines.append(f"| 1/{1 / snr:.0f} | {n} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_max = max(r["n"] for r in rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["snr"], r["rel_mse"]) for r in rows if r["method"] == method and r["n"] == n_max)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    ax.set(xscale="log", yscale="log", xlabel="SNR", ylabel="relative MSE", title=f"sets of N = {n_max}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_gallery(batch: dict, methods: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outputs = {"clean": batch["clean"], **{k: fn(batch) for k, fn in methods.items()}}
    k = 4
    fig, axes = plt.subplots(k, len(outputs), figsize=(1.6 * len(outputs), 1.6 * k))
    for col, (name, images) in enumerate(outputs.items()):
        for row in range(k):
            axes[row, col].imshow(images[0, row].detach().cpu(), cmap="gray")
            axes[row, col].set_axis_off()
        axes[0, col].set_title(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
