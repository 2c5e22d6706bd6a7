"""``cryol evaluate``: quality measures without ground truth (half-map FSC, moment consistency, cross-half FRC).

Example::

    cryol evaluate --half-maps rec/map_half1.mrc rec/map_half2.mrc --mask mask.mrc --out eval/
    cryol evaluate --particles particles.star --denoised denoised/particles.star --out eval/

``--half-maps`` gives the FSC between two independently refined half maps (optionally masked)
and the resolutions where it falls below 0.143 and 0.5. ``--particles`` with ``--denoised``
(the same particles in the same order, e.g. from ``cryol denoise``) compares the denoised images
with the raw ones: the moments of the denoised images against the noise-debiased moments of the
raw images (per CTF group and angular block, with the raw estimate's sampling error as the
yardstick), and, when the STAR carries poses, the cross-validation FRC: each half set's
images (raw and denoised) against projections of a map reconstructed from the other half's
raw images. ``--denoiser`` (a shipped model name or a ``cryol fit`` checkpoint) instead of
``--denoised`` denoises every particle first, as ``cryol denoise`` does (at the input's box and
pixel size), and evaluates the result. Writes metrics.json, CSV tables and PNG plots into
``--out`` and prints a summary.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from jsonargparse.typing import NonNegativeInt, PositiveInt
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cryo_lightning.abinitio.evaluation import (MomentConsistency, cross_validation_frc, half_map_fsc, half_sets,
                                               image_moment_consistency, shell_frequencies)
from cryo_lightning.abinitio.image_moments import group_by_defocus
from cryo_lightning.data.particle_source import (ParticleSource, metadata_batch, nonfinite_rows, preprocess_rows,
                                                 without_nonfinite)
from cryo_lightning.data.preprocess import PreprocessConfig, Preprocessor, background_stats
from cryo_lightning.io.atomic_write import atomic_path
from cryo_lightning.io.errors import InputError
from cryo_lightning.io.json_text import json_safe, json_text
from cryo_lightning.io.output_set import output_set
from cryo_lightning.io.stack_header import read_stack_info
from cryo_lightning.physics.noise import estimate_noise_variance
from cryo_lightning.physics.rotations import euler_to_matrix
from cryo_lightning.plots import fsc_plot, moment_consistency_plot
from cryo_lightning.tools.common import (add_flag, open_particle_input, parse_assume, pick_device, prepare_outputs,
                                         tool_parser)

__all__ = ["evaluate", "main"]

# Default working box at most this: the moment basis costs O(L^4) memory (~1 GB at 128).
DEFAULT_MAX_BOX = 128

UNITS = ("normalized", "raw")


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path, overwrite=True) as tmp:  # prepare_outputs already checked --overwrite
        Path(tmp).write_text(text)


def _write_csv(path: Path, table: pd.DataFrame) -> None:
    _write_text(path, table.to_csv(index=False, float_format="%.6g"))


def _curve_table(L: int, pixel: float, curves: dict[str, list[float]]) -> pd.DataFrame:
    shells = np.arange(L // 2 + 1)
    with np.errstate(divide="ignore"):
        resolution = np.where(shells > 0, L * pixel / np.maximum(shells, 1), np.inf)
    return pd.DataFrame({"shell": shells, "frequency_per_A": shells / (L * pixel), "resolution_A": resolution,
                         **{k: np.asarray(v) for k, v in curves.items()}})


# -- particles ---------------------------------------------------------------------------------


def _open_denoised(path: str, raw: ParticleSource, scratch: Path, datadir: str | None,
                   assume: dict[str, float] | None, strict: bool) -> tuple[ParticleSource, ParticleSource]:
    """The raw and denoised particles, row for row; a plain stack gets the raw particles' field of
    view as pixel size. Particles whose denoised image holds NaN or Inf are left out of both, with
    a warning (refused with ``strict``)."""
    pixel = None
    if Path(path).suffix.lower() in (".mrcs", ".mrc"):
        info = read_stack_info(Path(path))
        pixel = float(raw.table.particles["pixel_size_A"].median()) * raw.box / info.nx
    source = open_particle_input(path, scratch, datadir, pixel, assume, check_finite=False)
    if len(source) != len(raw):
        raise InputError(f"{path}: {len(source)} denoised particles but {len(raw)} raw ones in "
                         f"{raw.table.source}; --denoised must hold the same particles in the same order "
                         "(as cryol denoise writes them)")
    raw_fov = float(raw.table.particles["pixel_size_A"].median()) * raw.box
    fov = float(source.table.particles["pixel_size_A"].median()) * source.box
    if abs(fov - raw_fov) > 0.01 * raw_fov:
        raise InputError(f"{path}: the denoised images span {fov:.1f} A but the raw ones {raw_fov:.1f} A "
                         "(pixel size x box); they must be the same particles, only resampled")
    if raw.table.has_ctf and source.table.has_ctf:
        a = raw.table.particles["defocus_u_A"].to_numpy()
        b = source.table.particles["defocus_u_A"].to_numpy()
        bad = np.flatnonzero(~np.isclose(a, b, rtol=1e-4, atol=1.0))
        if len(bad):
            raise InputError(f"{path}: row {bad[0] + 1} has defocus {b[bad[0]]:.1f} A but the raw particle "
                             f"{a[bad[0]]:.1f} A; --denoised must list the same particles in the same order")
    bad = nonfinite_rows(source)
    if not len(bad):
        return raw, source
    kept = without_nonfinite(source, strict, name=path, bad=bad)
    print(f"cryol evaluate: warning: {kept.warnings[-1]}", file=sys.stderr)
    return raw.subset(np.setdiff1d(np.arange(len(raw)), bad)), kept


def _background_stats(images: torch.Tensor, radius_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~cryo_lightning.data.preprocess.background_stats` with the standard deviation kept
    above 0 (needed here to apply one particle's normalisation to another image of it)."""
    mean, std = background_stats(images, radius_fraction)
    return mean, std.clamp_min(torch.finfo(images.dtype).tiny)


def _load_pair(raw: ParticleSource, den: ParticleSource, rows: np.ndarray, L: int, units: str,
               noise_variance: float | None, dev: torch.device, chunk: int = 1024) -> dict:
    """Raw and denoised images of ``rows`` at box ``L``, both in the raw particle's background-normalised
    units (as ``cryol denoise`` normalises), plus the raw images' effective CTFs, pixel sizes and
    per-image noise variances in those units."""
    radius = PreprocessConfig().background_radius

    def processor(box: int, size: int) -> Preprocessor:
        return Preprocessor(PreprocessConfig(out_box=size if size != box else None, normalize=False), box)

    raw_proc, den_proc = processor(raw.box, L), processor(den.box, L)
    # "normalized" denoised images are in units of the raw particle normalised at the denoised box
    stats_proc = processor(raw.box, den.box) if units == "normalized" and den.box != L else None
    mode = raw.ctf_mode(raw_proc.config)
    out = {"raw": [], "denoised": [], "ctf": [], "pixel": [], "sigma2": []}
    for s in tqdm(range(0, len(rows), chunk), desc="reading", unit="chunk", disable=None):
        r = rows[s : s + chunk]
        stored = torch.from_numpy(raw.read(r)).to(dev)
        p, meta = preprocess_rows(raw, r, raw_proc, dev, images=stored, stored_mode=mode)
        # images in the raw stack's units share its data sign; cryol denoise wrote sign-corrected ones
        sign = meta["data_sign"] if units == "raw" else None
        d = preprocess_rows(den, r, den_proc, dev, data_sign=sign, stored_mode="none", with_ctf=False)[0]["images"]
        if stats_proc is not None:  # back to raw units (resampling keeps constants and is linear)
            at_den_box = preprocess_rows(raw, r, stats_proc, dev, images=stored, stored_mode="none", with_ctf=False)[0]
            m, sd = _background_stats(at_den_box["images"], radius)
            d = d * sd + m
        m, sd = _background_stats(p["images"], radius)
        x = (p["images"] - m) / sd
        if units == "raw" or stats_proc is not None:
            d = (d - m) / sd
        if noise_variance is None:
            sigma2 = estimate_noise_variance(x)  # the corners, outside the inscribed disk
        else:  # raw pixel units at the stored box -> resampled (white noise: variance x (L/box)^2) and normalised
            sigma2 = noise_variance * (L / raw.box) ** 2 / sd.flatten().square()
        out["raw"].append(x)
        out["denoised"].append(d)
        if mode != "none":  # no CTF: the reconstruction takes None rather than a stack of ones
            out["ctf"].append(p["ctf"].expand_as(x).clone())
        out["pixel"].append(p["pixel_size"])
        out["sigma2"].append(sigma2)
    return {k: torch.cat(v) if v else None for k, v in out.items()}


def _moments_table(mc: MomentConsistency) -> pd.DataFrame:
    n = len(mc.m2_difference)
    return pd.DataFrame({
        "block": ["M1", *(f"M2_k{k}" for k in range(n)), "M2_all"],
        "relative_difference": [mc.m1_difference, *mc.m2_difference, mc.m2_total_difference],
        "raw_sampling_error": [mc.m1_error, *mc.m2_error, mc.m2_total_error],
        "energy_ratio": [np.nan, *mc.m2_energy_ratio, mc.m2_total_energy_ratio],
    })


def _poses(source: ParticleSource, rows: np.ndarray) -> torch.Tensor | None:
    angles = source.table.particles[["rot_deg", "tilt_deg", "psi_deg"]].to_numpy(np.float64)[rows]
    return None if np.isnan(angles).any() else euler_to_matrix(torch.from_numpy(angles))


# -- the command -------------------------------------------------------------------------------


def evaluate(
    out: str, half_maps: list[str] | None = None, mask: str | None = None, particles: str | None = None,
    denoised: str | None = None, denoised_units: str = "normalized", noise_variance: float | None = None,
    box: int | None = None, max_images: int | None = 10000, k_max: int = 8, bandlimit: float = 0.5,
    ctf_groups: int = 4, frc: bool = True, lam: float = 1e-2, iterations: int = 30, datadir: str | None = None,
    pixel_size: float | None = None, assume: dict[str, float] | None = None, device: str = "auto",
    overwrite: bool = False, seed: int = 0, denoiser: str | None = None, strict: bool = False,
) -> dict:
    """Run ``cryol evaluate`` (module docstring); returns the metrics also written to ``metrics.json``.

    ``denoiser``: a shipped model name or checkpoint that denoises ``particles`` first, in place of
    ``denoised``. ``strict``: refuse particles with NaN/Inf images instead of leaving them out."""
    if denoised and denoiser:
        raise InputError("--denoised and --denoiser both given: evaluate a denoised stack, or denoise with a model")
    if not half_maps and not (particles or denoised or denoiser):
        raise InputError("nothing to evaluate: give --half-maps H1.mrc H2.mrc and/or --particles RAW.star "
                         "--denoised DENOISED.star")
    if half_maps and len(half_maps) != 2:
        raise InputError(f"--half-maps takes two maps, got {len(half_maps)}")
    if mask and not half_maps:
        raise InputError("--mask applies to --half-maps; give the two half maps too")
    if bool(particles) != bool(denoised or denoiser):
        raise InputError("--particles and --denoised (or --denoiser) go together: the raw particles and their "
                         "denoised images (or the model that denoises them)")
    if max_images is not None and max_images < 2:
        raise InputError(f"--max-images {max_images}: need at least 2 particles")
    if denoised_units not in UNITS:
        raise InputError(f"--denoised-units must be one of {', '.join(UNITS)} (got {denoised_units!r})")
    if denoiser and denoised_units != "normalized":
        raise InputError("--denoiser writes normalized units (as cryol denoise does); drop --denoised-units")
    folder = Path(out)
    paths = {"json": folder / "metrics.json"}
    metrics: dict = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as publish:
        inputs = [Path(p) for p in (*(half_maps or []), mask) if p]
        raw = den = None
        if particles:
            if denoiser:  # denoised as `cryol denoise` would, into the scratch folder
                from cryo_lightning.tools.denoise import denoise_particles

                is_file = Path(denoiser).is_file()
                denoised = str(denoise_particles(denoiser if is_file else None, particles, str(Path(tmp) / "denoised"),
                                                 datadir=datadir, pixel_size=pixel_size, assume=assume, device=device,
                                                 seed=seed, model=None if is_file else denoiser, strict=strict)[1])
            raw = open_particle_input(particles, Path(tmp), datadir, pixel_size, assume, strict)
            raw, den = _open_denoised(denoised, raw, Path(tmp), datadir, assume, strict)
            # the denoised file's metadata only identifies its images (CTF and poses come from the
            # raw file), so its warnings (e.g. no CTF in a plain stack) do not concern the user
            for message in raw.warnings:
                print(f"cryol evaluate: warning: {message}", file=sys.stderr)
            inputs += [Path(particles), Path(denoised), *(i.path for i in raw.reader.infos),
                       *(i.path for i in den.reader.infos)]
            L = min(raw.box, den.box)
            if box is not None and not 8 <= box <= L:
                raise InputError(f"--box {box}: must be between 8 and the smaller stack's box ({L})")
            if box is None and L > DEFAULT_MAX_BOX:
                # the dense steerable basis of the moments grows as L^4 (tens of GB at L = 320)
                print(f"cryol evaluate: working at box {DEFAULT_MAX_BOX} (the particles Fourier-downsampled from "
                      f"{L}); --box chooses another", file=sys.stderr)
                box = DEFAULT_MAX_BOX
            L = box or L
            rng = np.random.default_rng(seed)
            n = len(raw)
            rows = np.sort(rng.choice(n, max_images, replace=False)) if max_images and max_images < n \
                else np.arange(n)
            rotations = _poses(raw, rows)
            frc_skip = "--no-frc" if not frc else None if rotations is not None else \
                f"{particles} has no poses (rlnAngleRot/Tilt/Psi) to reconstruct and project with"
            df = raw.table.particles.iloc[rows]
            if frc_skip is None:
                subsets, how = half_sets(torch.tensor(df["random_subset"].to_numpy()), torch.tensor(rows))
                if min(int((subsets == 1).sum()), int((subsets == 2).sum())) < 2:
                    frc_skip = f"a half set ({how}) has fewer than 2 particles"
            paths.update({"moments_png": folder / "moments.png", "moments_csv": folder / "moments.csv"})
            if frc_skip is None:
                paths.update({"frc_png": folder / "frc.png", "frc_csv": folder / "frc.csv"})
        if half_maps:
            paths.update({"fsc_png": folder / "fsc.png", "fsc_csv": folder / "fsc.csv"})
        prepare_outputs(list(paths.values()), inputs, overwrite)
        staged = publish.enter_context(output_set(paths, overwrite))  # published together at the end

        if half_maps:
            t = time.perf_counter()
            metrics["half_maps"] = fsc = half_map_fsc(half_maps[0], half_maps[1], mask, pixel_size)
            if "warning" in fsc:
                print(f"cryol evaluate: warning: {fsc['warning']}", file=sys.stderr)
            fsc_plot(staged["fsc_png"], {"half maps" + (" (masked)" if mask else ""): fsc["fsc"]}, fsc["box"],
                     fsc["pixel_size_A"])
            _write_csv(staged["fsc_csv"], _curve_table(fsc["box"], fsc["pixel_size_A"], {"fsc": fsc["fsc"]}))
            seconds["half_maps"] = time.perf_counter() - t

        if particles:
            dev = pick_device(device)
            t = time.perf_counter()
            data = _load_pair(raw, den, rows, L, denoised_units, noise_variance, dev)
            pixel = float(data["pixel"].median())
            seconds["read"] = time.perf_counter() - t
            metrics["particles"] = {
                "raw": str(particles),
                "denoised": f"{denoiser} (denoised by cryol evaluate)" if denoiser else str(denoised),
                "n_images": int(len(rows)), "box": L,
                "pixel_size_A": pixel, "denoised_units": denoised_units, "ctf_mode": raw.ctf_mode(PreprocessConfig()),
                "noise_variance": {"source": "background" if noise_variance is None else "--noise-variance",
                                   "mean_normalised": float(data["sigma2"].mean())},
            }

            t = time.perf_counter()
            groups, n_groups = None, 1
            if raw.table.has_ctf:
                groups, _ = group_by_defocus(metadata_batch(raw, rows)["ctf_params"], ctf_groups)
                n_groups = int(groups.max()) + 1
            mc = image_moment_consistency(data["raw"], data["denoised"], data["sigma2"], groups, n_groups, k_max, bandlimit)
            metrics["moments"] = {"k_max": k_max, "bandlimit": bandlimit, "ctf_groups": n_groups, **asdict(mc)}
            moment_consistency_plot(staged["moments_png"], mc)
            _write_csv(staged["moments_csv"], _moments_table(mc))
            seconds["moments"] = time.perf_counter() - t

            if frc_skip is None:
                t = time.perf_counter()
                origins = torch.tensor(df[["shift_x_A", "shift_y_A"]].to_numpy(np.float32), device=dev) \
                    / data["pixel"][:, None]
                cv = cross_validation_frc(data["raw"], {"raw": data["raw"], "denoised": data["denoised"]},
                                          rotations.float().to(dev), subsets.to(dev), data["ctf"], origins,
                                          lam=lam, iterations=iterations)
                curves = {k: v.tolist() for k, v in cv.frc.items()}
                metrics["frc"] = {
                    "half_sets": how, "n_images": cv.n_images, "lam": lam, "iterations": iterations,
                    "frequency_per_A": shell_frequencies(L, pixel), "raw": curves["raw"], "denoised": curves["denoised"],
                    "raw_stderr": cv.stderr["raw"].tolist(), "denoised_stderr": cv.stderr["denoised"].tolist(),
                    # shell 0 (the mean) carries no resolution information
                    "mean_raw": float(cv.frc["raw"][1:].mean()), "mean_denoised": float(cv.frc["denoised"][1:].mean()),
                    "cg_residual": [r[-1] if r else None for r in cv.residuals],
                }
                fsc_plot(staged["frc_png"], {"raw images": curves["raw"], "denoised images": curves["denoised"]},
                         L, pixel, ylabel="cross-validation FRC")
                _write_csv(staged["frc_csv"], _curve_table(L, pixel, {
                    "frc_raw": curves["raw"], "frc_raw_stderr": metrics["frc"]["raw_stderr"],
                    "frc_denoised": curves["denoised"], "frc_denoised_stderr": metrics["frc"]["denoised_stderr"]}))
                seconds["frc"] = time.perf_counter() - t
            else:
                metrics["frc"] = {"skipped": frc_skip}
        metrics["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
        metrics["outputs"] = {k: str(v) for k, v in paths.items()}
        metrics = json_safe(metrics)
        _write_text(staged["json"], json_text(metrics))
    return metrics


def summary(metrics: dict) -> str:
    """The printed summary table of :func:`evaluate`'s metrics."""
    lines = []
    if "half_maps" in metrics:
        h = metrics["half_maps"]
        res = {t: (f"{r:.1f} A" if r is not None else "none (no correlation)") for t, r in h["resolution_A"].items()}
        lines += [f"Half-map FSC{' (masked)' if h['mask'] else ''}: resolution {res['0.143']} at FSC 0.143, "
                  f"{res['0.5']} at FSC 0.5 (box {h['box']}, {h['pixel_size_A']:.3f} A/px)"]
        if "warning" in h:
            lines += [f"  (not a resolution: {h['warning']})"]
    if "moments" in metrics:
        m, p = metrics["moments"], metrics["particles"]
        lines += ["", f"Moment consistency: denoised vs noise-debiased raw ({p['n_images']} images, box {p['box']}, "
                      f"{m['ctf_groups']} CTF group{'s' if m['ctf_groups'] != 1 else ''}, "
                      f"noise variance from {p['noise_variance']['source']})",
                  f"  {'block':<8} {'rel. diff':>10} {'raw error':>10} {'diff/err':>9} {'energy ratio':>13}"]

        def row(name: str, diff: float, err: float, ratio: float | None) -> str:
            z = diff / err if err > 0 else math.inf
            r = f"{ratio:13.3f}" if ratio is not None else f"{'':>13}"
            return f"  {name:<8} {diff:10.4f} {err:10.4f} {z:9.1f} {r}"

        lines.append(row("M1", m["m1_difference"], m["m1_error"], None))
        for k, (d, e, r) in enumerate(zip(m["m2_difference"], m["m2_error"], m["m2_energy_ratio"])):
            lines.append(row(f"M2 k={k}", d, e, r))
        lines.append(row("M2 all", m["m2_total_difference"], m["m2_total_error"], m["m2_total_energy_ratio"]))
        lines.append("  (diff/err well above 1: the denoised images' moments disagree with the raw data; "
                     "energy ratio < 1: shrinkage, > 1: added variance)")
    if "frc" in metrics:
        f = metrics["frc"]
        if "skipped" in f:
            lines += ["", f"Cross-validation FRC skipped: {f['skipped']}"]
        else:
            L = metrics["particles"]["box"]
            pixel = metrics["particles"]["pixel_size_A"]
            lines += ["", f"Cross-validation FRC (half sets from {f['half_sets']}; map from one half's raw images "
                          "vs the other half's images), mean over images:",
                      f"  {'resolution':>10} {'raw':>7} {'denoised':>9}"]
            for shell in sorted({max(1, round(L / 2 * q)) for q in (0.125, 0.25, 0.5, 0.75, 1.0)}):
                lines.append(f"  {L * pixel / shell:8.1f} A {f['raw'][shell]:7.3f} {f['denoised'][shell]:9.3f}")
            lines.append(f"  {'all rings':>10} {f['mean_raw']:7.3f} {f['mean_denoised']:9.3f}")
    lines += ["", "Outputs: " + ", ".join(Path(v).name for v in metrics["outputs"].values())
              + f" in {Path(metrics['outputs']['json']).parent}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse ``cryol evaluate`` arguments, run :func:`evaluate` and print its summary."""
    p = tool_parser("cryol evaluate", __doc__)
    p.add_argument("--out", required=True, help="output folder (metrics.json, CSV tables, PNG plots)")
    p.add_argument("--half-maps", type=str, nargs=2, default=None, help="two half maps (.mrc) for the FSC")
    p.add_argument("--mask", type=str | None, default=None,
                   help="mask (.mrc, values in [0, 1]) applied to both half maps")
    p.add_argument("--particles", type=str | None, default=None,
                   help="raw particles: RELION .star, cryoSPARC .cs or a plain .mrcs stack")
    p.add_argument("--denoised", type=str | None, default=None,
                   help="the same particles denoised, same order (STAR from cryol denoise, or a .mrcs stack)")
    p.add_argument("--denoiser", type=str | None, default=None,
                   help="instead of --denoised: a shipped model (cryol models) or cryol fit checkpoint that denoises "
                        "--particles first, as cryol denoise does")
    p.add_argument("--denoised-units", type=str, default="normalized",
                   help="'normalized': background-normalised units as cryol denoise writes them; "
                        "'raw': the raw stack's units")
    p.add_argument("--noise-variance", type=float | None, default=None,
                   help="noise variance per pixel of the raw stack as stored (default: from each particle's "
                        "background, outside the inscribed disk)")
    p.add_argument("--box", type=PositiveInt | None, default=None,
                   help=f"work at this box (default: the denoised stack's, at most {DEFAULT_MAX_BOX})")
    p.add_argument("--max-images", type=PositiveInt | None, default=10000, help="seeded random subset of this many particles")
    p.add_argument("--k-max", type=NonNegativeInt, default=8, help="moments: highest angular block k")
    p.add_argument("--bandlimit", type=float, default=0.5, help="moments: band limit, cycles/pixel")
    p.add_argument("--ctf-groups", type=PositiveInt, default=4, help="moments: equal-count defocus groups")
    add_flag(p, "--frc", True, "cross-validation FRC (needs poses; reconstructs two half maps)")
    p.add_argument("--lam", type=float, default=1e-2, help="FRC: Tikhonov weight of the half-map reconstruction")
    p.add_argument("--iterations", type=PositiveInt, default=30, help="FRC: conjugate-gradient iterations")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-images subset")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    metrics = evaluate(args.out, args.half_maps, args.mask, args.particles, args.denoised, args.denoised_units,
                       args.noise_variance, args.box, args.max_images, args.k_max, args.bandlimit, args.ctf_groups,
                       args.frc, args.lam, args.iterations, args.datadir, args.pixel_size, parse_assume(args.assume),
                       args.device, args.overwrite, args.seed, args.denoiser, args.strict)
    print(summary(metrics))
