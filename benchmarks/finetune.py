"""Self-supervised fine-tuning benchmark: true relative MSE of `cryol denoise` outputs on a simulated stack.

`cryol simulate` writes clean images beside the noisy ones, so a model fine-tuned without clean
images (configs/finetune_relion.yaml) can be scored against the truth. Each checkpoint
(``LABEL=PATH``: a DenoiseTask, SelfSupervisedDenoiseTask or JointTask checkpoint, or
``LABEL=pretrained:NAME``, a shipped model with its registry settings) denoises every
particle of the stack with `cryol denoise` (random context sets); the clean images are normalised
as `cryol denoise` normalises the noisy ones (each noisy image's background mean and standard
deviation, background beyond 0.75 L / 2), and the mean per-image relative MSE is reported, with
the noisy input's as the reference.

    python benchmarks/finetune.py --sim runs/quickstart/simulated \\
        --checkpoint "shipped=pretrained:cwf-unet-real" \\
        "fine-tuned=runs/finetune_relion/checkpoints/last.ckpt" --out benchmarks/results/finetune_shipped
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from cryo_lightning.data.preprocess import background_stats
from cryo_lightning.io.mrc import read_stack
from cryo_lightning.metrics import relative_mse
from cryo_lightning.tools.denoise import denoise_particles


def normalised(noisy: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both stacks in the units `cryol denoise` works in (the noisy images' background statistics)."""
    mean, std = background_stats(noisy, 0.75)
    return (noisy - mean) / std, (clean - mean) / std


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sim", default="runs/quickstart/simulated", help="a `cryol simulate` output folder")
    p.add_argument("--checkpoint", nargs="+", required=True, help="LABEL=PATH")
    p.add_argument("--set-size", type=int, default=32, help="context set size (0: each model's default)")
    p.add_argument("--out", default="benchmarks/results/finetune_cpu")
    args = p.parse_args()
    sim = Path(args.sim)
    noisy, clean = normalised(read_stack(sim / "particles.mrcs").float(), read_stack(sim / "particles_clean.mrcs").float())
    rows = [{"label": "noisy input", "checkpoint": None, "rel_mse": float(relative_mse(noisy, clean).mean())}]
    for item in args.checkpoint:
        label, path = item.split("=", 1)
        with tempfile.TemporaryDirectory() as tmp:
            shipped = path.removeprefix("pretrained:") if path.startswith("pretrained:") else None
            stack, _ = denoise_particles(None if shipped else path, str(sim / "particles.star"), tmp,
                                         set_size=args.set_size or None, device="cpu", model=shipped)
            denoised = read_stack(stack).float()
        rows.append({"label": label, "checkpoint": path, "rel_mse": float(relative_mse(denoised, clean).mean())})
        print(rows[-1], flush=True)
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2))
    lines = [f"Machine: {machine}. Stack {sim} ({noisy.shape[0]} particles, L = {noisy.shape[-1]}); mean per-image "
             "relative MSE against the normalised clean images.", "", "| model | checkpoint | relative MSE |",
             "|---|---|---|"]
    lines += [f"| {r['label']} | {r['checkpoint'] or ''} | {r['rel_mse']:.3f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
