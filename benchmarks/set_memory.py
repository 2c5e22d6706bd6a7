"""Peak memory of the rotational set transformer, forward and backward, per set size and box.

Each setting runs in a fresh child process: the model of
``configs/denoise_rotational_transformer_cpu.yaml`` (its ``net`` settings, at box ``L``) denoises
one set of ``N`` random images with their CTFs, and the loss is back-propagated. The peak is the
child's maximum resident set size after the step minus its size just before the step (the
interpreter, torch and the model), so it is what the step itself needs, activations and
gradients included. On a GPU ``torch.cuda.max_memory_allocated`` is reported instead.

    python benchmarks/set_memory.py --json benchmarks/results/set_memory.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "denoise_rotational_transformer_cpu.yaml"


def _measure(L: int, N: int, device: str, queue) -> None:
    import torch

    from cryo_lightning.models.rotational_transformer import RotationalSetTransformer

    torch.manual_seed(0)
    settings = dict(yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["net"]["init_args"])
    settings["L"] = L
    model = RotationalSetTransformer(**settings).to(device)
    noisy = torch.randn(1, N, L, L, device=device)
    ctf = torch.ones_like(noisy)
    variance = torch.ones(1, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = model(noisy, ctf, variance)
    out.square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    queue.put({"L": L, "n": N, "device": device, "peak_bytes": int(peak),
               "parameters": sum(p.numel() for p in model.parameters())})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--boxes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    context = mp.get_context("spawn")  # a fresh process per setting: its peak is its own
    rows = []
    print("| L | N | peak memory, forward + backward (GiB) |\n|---|---|---|")
    for L in args.boxes:
        for N in args.sizes:
            queue = context.Queue()
            child = context.Process(target=_measure, args=(L, N, args.device, queue))
            child.start()
            row = queue.get()
            child.join()
            rows.append(row)
            print(f"| {L} | {N} | {row['peak_bytes'] / 2**30:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                         "config": str(CONFIG.relative_to(ROOT)), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
