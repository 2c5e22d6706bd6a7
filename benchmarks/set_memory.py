"""Peak memory of the rotational set transformer, forward and backward, per set size and box.

Each setting runs in a fresh child process: the model of a config (its ``net`` settings, at box
``L``; ``configs/denoise_rotational_transformer_cpu.yaml`` unless ``--config`` names another)
denoises one set of ``N`` projections of a held-out procedural molecule (SNR 1/4, CTFs, shifts up to
``3 L / 32`` pixels), and the loss is back-propagated. With
``guide: em`` the step includes the EM reconstruction that makes the guide (no gradient flows
through it, but its memory is part of the forward pass). The peak is the
child's maximum resident set size after the step minus its size just before the step (the
interpreter, torch and the model), so it is what the step itself needs, activations and
gradients included. On a GPU ``torch.cuda.max_memory_allocated`` is reported instead.

    python benchmarks/set_memory.py --json benchmarks/results/set_memory.json
    python benchmarks/set_memory.py --config configs/denoise_em_transformer_cpu.yaml \
        --json benchmarks/results/set_memory_em.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "denoise_rotational_transformer_cpu.yaml"


def _simulate(L: int, N: int, path: Path) -> None:
    """One set of projections of a held-out molecule at SNR 1/4, shifts up to ``3 L / 32`` pixels.

    Not random images: the EM guide's memory grows with the resolution it reaches (its band),
    which noise alone would keep low. Made in the parent, so that the child's peak is the step's.
    """
    import torch

    from cryo_lightning.data.molecule_bank import MoleculeBank
    from cryo_lightning.data.set_simulator import SetSimulator, SimulationConfig

    bank = MoleculeBank(L, "test", 1, 0, family="structures", pixel_size_range=(3.0, 12.0))
    batch = SetSimulator(bank, SimulationConfig(set_size=N, snr=(0.25, 0.25), max_shift=3.0 * L / 32))(
        torch.tensor([0]), torch.tensor([0]))
    torch.save({k: batch[k] for k in ("noisy", "ctf", "noise_variance")}, path)


def _measure(config: Path, data: Path, L: int, N: int, device: str, queue) -> None:
    import torch

    from cryo_lightning.models.rotational_transformer import RotationalSetTransformer

    torch.manual_seed(0)
    settings = dict(yaml.safe_load(config.read_text())["model"]["init_args"]["net"]["init_args"])
    if "em_max_shift" in settings:  # the shift range in pixels grows with the box
        settings["em_max_shift"] = settings["em_max_shift"] * L / settings.get("L", 32)
    settings["L"] = L
    model = RotationalSetTransformer(**settings).to(device)
    noisy, ctf, variance = (t.to(device) for t in torch.load(data).values())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = model(noisy, ctf, variance)
    out.square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    queue.put({"L": L, "n": N, "device": device, "peak_bytes": int(peak), "seconds": time.perf_counter() - start,
               "em_max_shift": settings.get("em_max_shift"),
               "parameters": sum(p.numel() for p in model.parameters())})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--boxes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", type=Path, default=CONFIG, help="a model config (its net's settings)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    context = mp.get_context("spawn")  # a fresh process per setting: its peak is its own
    rows = []
    print("| L | N | peak memory, forward + backward (GiB) |\n|---|---|---|")
    for L in args.boxes:
        for N in args.sizes:
            queue = context.Queue()
            data = Path(tempfile.mkdtemp()) / "set.pt"
            _simulate(L, N, data)
            child = context.Process(target=_measure, args=(args.config.resolve(), data, L, N, args.device, queue))
            child.start()
            row = queue.get()
            child.join()
            shutil.rmtree(data.parent, ignore_errors=True)
            rows.append(row)
            print(f"| {L} | {N} | {row['peak_bytes'] / 2**30:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                         "config": str(args.config.resolve().relative_to(ROOT)), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
