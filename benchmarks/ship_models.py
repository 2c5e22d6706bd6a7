"""Put trained denoisers into the package: weights-only files and their models.json entries.

For each ``NAME=CHECKPOINT=CONFIG`` this exports the checkpoint's weights
(``cryo_lightning.tasks.pretrained.export_weights``: no optimizer state) to
``cryo_lightning/pretrained/NAME.pt`` and writes its registry entry: kind, training box,
pixel-size and SNR ranges and set size from the config's resolved data block (CONFIG goes after
the base that its header's command names, e.g. ``configs/base/denoise_realistic_l64.yaml`` for the
shipped models' training stages), the training command, the
wall time and machine (from the run's TensorBoard events), and held-out numbers: the relative MSE
per real map and SNR of ``benchmarks/results/realmaps.json`` when it has rows for the model, and
the model's own validation curve (first and last ``val/rel_mse``). The first name is the default.

    python benchmarks/ship_models.py \\
        cwf-unet-real=runs/denoise_cwf_unet_real/checkpoints/last.ckpt=configs/denoise_cwf_unet_real.yaml \\
        guided-unet-real=runs/denoise_guided_unet_real/checkpoints/last.ckpt=configs/denoise_guided_unet_real.yaml
"""

from __future__ import annotations

import argparse
import glob
import json
import platform
import re
from pathlib import Path

import torch
import yaml

from cryo_lightning.launch.freeze import resolve_config
from cryo_lightning.tasks.model_registry import MANIFEST
from cryo_lightning.tasks.pretrained import export_weights

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTIONS = {
    "wiener": "U-Net refining the radial CTF-aware Wiener filter of its set (in effect single-image)",
    "cwf": "U-Net refining the covariance Wiener filter (CWF) of its context set",
}
SET_SIZES = {"wiener": 256, "cwf": 1024}  # context images at inference
# Largest box a model sees: the CWF guide's dense steerable basis holds about (pi/4 L^2)^2 values
# (0.6 GB and 40 s to build at L = 128), so larger particles go to it at coarser pixels.
MAX_BOXES = {"wiener": None, "cwf": 128}


def _curve(run_dir: Path) -> tuple[list[tuple[int, float]], float | None]:
    """(step, val/rel_mse) pairs and the wall time (s) of a run, from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(glob.glob(str(run_dir / "tensorboard" / "run" / "events*")))
    if not files:
        return [], None
    ea = EventAccumulator(files[-1])
    ea.Reload()
    curve = [(e.step + 1, round(e.value, 4)) for e in ea.Scalars("val/rel_mse")] if "val/rel_mse" in ea.Tags()["scalars"] else []
    losses = ea.Scalars("train/loss") if "train/loss" in ea.Tags()["scalars"] else []
    wall = (losses[-1].wall_time - losses[0].wall_time) if len(losses) > 1 else None
    return curve, wall


def _stages(config: str, ckpt: Path) -> list[tuple[str, Path]]:
    """The (config, checkpoint) of every training stage behind ``ckpt``, first stage first: a
    config whose model starts from ``init_ckpt`` (``runs/X/checkpoints/...``) follows the config
    of this repository that trains ``runs/X``."""
    by_run = {}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        root = (yaml.safe_load(path.read_text()) or {}).get("trainer", {}).get("default_root_dir")
        if root:
            by_run[root] = str(path.relative_to(ROOT))
    stages = [(config, ckpt)]
    while True:
        init = _resolved(stages[0][0])["model"]["init_args"].get("init_ckpt")
        if not init:
            return stages
        run = str(Path(init).parents[1])
        if run not in by_run:
            raise SystemExit(f"{stages[0][0]} starts from {init}, which no config in configs/ trains")
        stages.insert(0, (by_run[run], ROOT / init))


def _fit_args(config: str) -> list[str]:
    """``--config`` arguments of a stage: the base its header's command names (the shipped
    models' stages name configs/base/denoise_realistic_l64.yaml), then the config itself."""
    header = "\n".join(line for line in (ROOT / config).read_text().splitlines() if line.startswith("#"))
    found = re.search(r"--config (configs/base/\S+\.yaml) --config " + re.escape(config), header)
    return (["--config", found.group(1)] if found else []) + ["--config", config]


def _resolved(config: str) -> dict:
    """The fully resolved config of a training stage (run from the repository root)."""
    return resolve_config(["fit", *(str(ROOT / a) if a.endswith(".yaml") else a for a in _fit_args(config))])


def _realmaps(name: str) -> dict[str, float]:
    path = ROOT / "benchmarks" / "results" / "realmaps.json"
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    return {f"realmaps {r['map']} L{r['box']} SNR 1/{round(1 / r['snr'])}": round(r["rel_mse"], 3)
            for r in rows if r.get("method") == name}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="NAME=CHECKPOINT=CONFIG; the first is the default")
    p.add_argument("--manifest", default=str(MANIFEST))
    args = p.parse_args()
    manifest = Path(args.manifest)
    entries = []
    for spec in args.models:
        name, ckpt, config = spec.split("=")
        cfg = _resolved(config)
        net = cfg["model"]["init_args"]["net"]["init_args"]
        data = cfg["data"]["init_args"]
        sim = data["simulation"]
        guide = net.get("guide", "wiener")
        out = manifest.parent / f"{name}.pt"
        export_weights(ROOT / ckpt, out, overwrite=True)
        stages = _stages(config, ROOT / ckpt)
        steps, walls, curves = [], [], []
        for _, stage_ckpt in stages:
            steps.append(int(torch.load(stage_ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"]))
            curve, wall = _curve(Path(stage_ckpt).parents[1])
            walls.append(wall or 0.0)
            curves.append(curve)
        held = {"trained_steps": " + ".join(map(str, steps))}
        for k, curve in enumerate(curves):
            if curve:
                held[f"val_rel_mse_stage{k + 1}"] = f"{curve[0][1]} -> {curve[-1][1]}"
        held.update(_realmaps(name))
        entries.append({
            "name": name, "file": out.name, "kind": "set" if guide == "cwf" else "single-image",
            "description": DESCRIPTIONS[guide] + f"; trained on the realistic procedural families (docs/data.md), "
                           f"{out.stat().st_size / 1e6:.1f} MB",
            "config": config, "train_command": " && ".join(" ".join(["cryol fit", *_fit_args(c)]) for c, _ in stages),
            "wall_time": " + ".join(f"{w / 60:.0f}" for w in walls) + f" min on {platform.machine()} CPU, 2 cores",
            "box": int(data["box"]), "pixel_size_range": [float(v) for v in data["pixel_size_range"]],
            "snr_range": [float(v) for v in sim["snr"]], "set_size": SET_SIZES[guide],
            **({"max_box": MAX_BOXES[guide]} if MAX_BOXES[guide] else {}),
            "inference": {"sure_blend": True}, "held_out": held,
        })
        print(f"{name}: {out} ({out.stat().st_size / 1e6:.1f} MB), {held}")
    manifest.write_text(json.dumps({"default": entries[0]["name"], "models": entries}, indent=1) + "\n")
    print(f"Wrote {manifest}")


if __name__ == "__main__":
    main()
