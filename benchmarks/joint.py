"""Joint pipeline benchmark: the trained denoiser + learned reconstructor on held-out molecules.

For each checkpoint of a ``JointTask`` run (``cryol fit --config configs/quickstart.yaml`` or
``configs/joint.yaml``), the test molecules of its own ``JointDataModule`` settings (never seen
in training or validation) go through both routes of ``tasks/joint_report.py``: the denoised
images' moments and, for reference, the noise-debiased moments of the raw images, each fed to
the checkpoint's reconstructor, alone ("network") and after the MAP polish with its learned
prior ("polished"). Reported: medians over molecules of the image relative MSE (noisy and
denoised) and the O(3)-aligned relative volume errors, plus the per-molecule rows in JSON.

    python benchmarks/joint.py --checkpoint quickstart=runs/quickstart/checkpoints/last.ckpt \\
        --molecules 8 --out benchmarks/results/joint_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cryo_lightning.data.joint_examples import JointDataModule
from cryo_lightning.tasks.joint import JointTask
from cryo_lightning.tasks.joint_report import evaluate_pipeline

COLUMNS = ["noisy_rel_mse", "image_rel_mse", "network_err_raw", "network_err_denoised", "volume_err_raw",
           "volume_err_denoised"]


def load(path: str) -> tuple[JointTask, JointDataModule]:
    settings = torch.load(path, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    dm = JointDataModule(**{k: v for k, v in settings.items() if not k.startswith("_")})  # minus LightningCLI's _class_path
    task = JointTask.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    task.physics = dm
    return task, dm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True, help="LABEL=PATH of JointTask checkpoints")
    p.add_argument("--molecules", type=int, default=8)
    p.add_argument("--polish", type=int, default=200)
    p.add_argument("--prior-strength", type=float, default=0.1)
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--out", default="benchmarks/results/joint_cpu")
    args = p.parse_args()
    rows = []
    for item in args.checkpoint:
        label, path = item.split("=", 1)
        task, dm = load(path)
        t = time.perf_counter()
        report = evaluate_pipeline(task, dm, args.molecules, args.polish, args.prior_strength, split=args.split)
        rows.append({"label": label, "checkpoint": path, "seconds": time.perf_counter() - t,
                     "global_step": int(torch.load(path, map_location="cpu", weights_only=False)["global_step"]),
                     **report})
        print(label, {k: round(report["median"][k], 4) for k in COLUMNS}, flush=True)
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "args": vars(args), "runs": rows}, indent=2))
    lines = [f"Machine: {machine}. Medians over {args.molecules} {args.split} molecules, polish {args.polish}, "
             f"prior strength {args.prior_strength}.", "",
             "| run | steps | noisy | denoised | network, raw moments | network, denoised | polished, raw moments "
             "| polished, denoised |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["median"]
        lines.append(f"| {r['label']} | {r['global_step']} | " + " | ".join(f"{m[k]:.3f}" for k in COLUMNS) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
