"""``cryol reconstruct``: an ab initio 3D map from particles by common lines or by the method of moments.

Example::

    cryol reconstruct --star particles.star --method common-lines --out map.mrc --class-average
    cryol reconstruct --star particles.star --method moments --box 32 --out map.mrc

reads a RELION STAR, a cryoSPARC .cs or a plain .mrcs stack, downsamples and normalises the
particles (``--box``), optionally denoises them with a shipped or trained model (``--denoiser``,
at the model's pixel size, as ``cryol denoise`` does) and/or
replaces them by class averages (``--class-average``), finds the common lines of every pair,
estimates the poses by synchronization voting, and reconstructs by conjugate gradients with
each image's CTF. Writes ``map.mrc`` (with its pixel size), the two half maps, ``map.star`` (the
particles used, original ``rlnImageName``, estimated ``rlnAngleRot/Tilt/Psi``), ``map_fsc.png``
and ``map_fsc.json`` (FSC between half maps, and against ``--reference`` when given).

``--method moments`` needs no per-particle pose: it estimates the CTF-grouped, noise-debiased
image moments (M1, M2 and the third-moment slice; noise variance from each particle's
background) and fits a spherical Fourier-Bessel volume and a viewing distribution to them
(abinitio/moment_reconstruction.py). Half maps are fitted separately and aligned onto the full map over O(3)
before their FSC; no STAR is written (there are no poses), and the fitted viewing distribution
goes into the JSON report. ``--method learned --checkpoint last.ckpt`` does the same with a
trained reconstructor network (tasks/reconstructor.py) in place of the random starts, then a short
polish of the moment misfit plus the network's learned prior on the coefficients (weighted by
the moments' sampling error), and basin hops only if the misfit stays above the sampling error.

The map's orientation is arbitrary and its hand is undetermined (docs/conventions.md §15).
With ``--reference`` the input STAR must carry angles (e.g. from ``cryol simulate``): the
estimated poses are registered onto them, the rotation error is reported, and the map is
written in the reference frame so the two can be compared directly.
"""

from __future__ import annotations

import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from jsonargparse.typing import NonNegativeInt, PositiveInt
import numpy as np
import torch

from cryo_lightning.abinitio.class_average import class_averages
from cryo_lightning.abinitio.common_lines import detect_common_lines
from cryo_lightning.abinitio.image_moments import defocus_bins
from cryo_lightning.abinitio.least_squares_reconstruction import reconstruct
from cryo_lightning.abinitio.synchronization import estimate_rotations
from cryo_lightning.data.particle_source import ParticleSource, metadata_batch, preprocessed_chunks
from cryo_lightning.data.preprocess import PreprocessConfig, Preprocessor
from cryo_lightning.io.atomic_write import atomic_path
from cryo_lightning.io.errors import InputError
from cryo_lightning.io.json_text import json_text
from cryo_lightning.io.mrc import read_map, require_cubic, write_map, write_stack
from cryo_lightning.io.output_set import output_set
from cryo_lightning.io.particle_writer import star_blocks_for_stack
from cryo_lightning.io.star import write_particles_star
from cryo_lightning.physics.ctf import phase_flip
from cryo_lightning.physics.fourier import fft2c, fourier_resize, fourier_shell_correlation, ifft2c, resolution_at
from cryo_lightning.physics.projection import translate_spectrum
from cryo_lightning.physics.rotations import euler_to_matrix, matrix_to_euler, register_rotations
from cryo_lightning.plots import fsc_plot
from cryo_lightning.tools.common import add_flag, open_particle_input, parse_assume, pick_device, prepare_outputs, tool_parser

__all__ = ["ReconstructionReport", "MomentOptions", "reconstruct_particles", "main"]

METHODS = ("common-lines", "moments", "learned")
DEFAULT_BOX = 64  # working box when --box is not given (or the particles' box if smaller)
# fewest particles each method can use: two half maps, each from a set that the method can solve
# (synchronisation needs three views; the moments' covariance needs two images per half)
MIN_IMAGES = {"common-lines": 6, "moments": 4, "learned": 4}


@dataclass
class ReconstructionReport:
    """What ``cryol reconstruct`` did and measured (also written as ``<stem>_fsc.json``)."""

    map: str
    star: str
    n_images: int
    box: int
    pixel_size: float
    seconds: dict[str, float] = field(default_factory=dict)
    half_map_resolution_A: float | None = None  # FSC = 0.143 between half maps
    reference_resolution_A: float | None = None  # FSC = 0.5 against --reference
    rotation_error_deg: float | None = None  # mean, after registration onto the STAR's angles
    reflected: bool | None = None
    fsc_half: list[float] = field(default_factory=list)
    fsc_reference: list[float] = field(default_factory=list)
    method: str = "common-lines"
    moment_loss: float | None = None  # --method moments: final relative moment misfit
    aligned_relative_error: float | None = None  # --method moments with --reference (SFB coefficients, best scale)
    viewing_coefficients: list[float] = field(default_factory=list)  # --method moments


def _load(source: ParticleSource, rows: np.ndarray, processor: Preprocessor, dev: torch.device,
          chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Preprocessed, centred images ``(n, L, L)`` and effective CTFs of the given rows."""
    images, ctfs, pixels = [], [], []
    df = source.table.particles
    for r, out, _ in preprocessed_chunks(source, rows, processor, dev, chunk):
        # Centre each particle with its stored origin (RELION: particle at box centre - origin).
        origin_px = torch.tensor(df[["shift_x_A", "shift_y_A"]].to_numpy()[r], dtype=torch.float32, device=dev) \
            / out["pixel_size"][:, None]
        x = out["images"]
        if bool((origin_px != 0).any()):
            x = ifft2c(translate_spectrum(fft2c(x), origin_px)).real
        images.append(x)
        ctfs.append(out["ctf"].expand_as(x).clone())
        pixels.append(out["pixel_size"])
    return torch.cat(images), torch.cat(ctfs), float(torch.cat(pixels).median())


def _denoise(spec: str, images: torch.Tensor, source: ParticleSource, rows: np.ndarray, pixel: float, mode: str,
             set_size: int | None, seed: int) -> torch.Tensor:
    """``--denoiser``: :func:`~cryo_lightning.tasks.denoise_images.denoise_images` on the loaded particles."""
    from cryo_lightning.tasks.denoise_images import denoise_images  # Lightning only for this option

    meta = metadata_batch(source, rows)
    pixels = meta["pixel_size_A"].to(images.device) * (source.box / images.shape[-1])
    return denoise_images(spec, images, pixels, meta["ctf_params"], mode, set_size, seed, pixel, option="--denoiser",
                          warn=lambda message: print(f"cryol reconstruct: warning: {message}", file=sys.stderr))


def _true_rotations(source: ParticleSource, rows: np.ndarray, star: Path) -> torch.Tensor:
    df = source.table.particles.iloc[rows]
    angles = df[["rot_deg", "tilt_deg", "psi_deg"]].to_numpy(np.float64)
    if np.isnan(angles).any():
        raise InputError(f"{star}: --reference needs rlnAngleRot/Tilt/Psi in the STAR (e.g. from cryol simulate) "
                         "to register the estimated poses onto; this file has none")
    return euler_to_matrix(torch.tensor(angles))


def reconstruct_particles(
    star: str, out: str, method: str = "common-lines", box: int | None = None, max_images: int | None = 2000,
    class_average: bool = False, n_classes: int | None = None, n_neighbors: int = 10, denoiser: str | None = None,
    set_size: int | None = None, reference: str | None = None, n_angles: int = 360, max_radius: float = 0.4,
    lam: float = 1e-2, iterations: int = 30, datadir: str | None = None, pixel_size: float | None = None,
    assume: dict[str, float] | None = None, device: str = "auto", overwrite: bool = False, seed: int = 0,
    moments: MomentOptions | None = None, strict: bool = False,
) -> ReconstructionReport:
    """Run the whole ``cryol reconstruct`` pipeline (see the module docstring); returns the report.

    The outputs are published together when everything has been written (nothing on failure);
    ``strict`` refuses particles with NaN/Inf images instead of leaving them out."""
    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)} (got {method!r})")
    if method in ("moments", "learned") and class_average:
        raise InputError(f"--class-average does not apply to --method {method} (moments use every particle)")
    if method == "learned" and not (moments and moments.checkpoint):
        raise InputError("--method learned needs --checkpoint: a ReconstructorTask checkpoint from "
                         "`cryol fit --config configs/reconstructor_cpu.yaml` (runs/.../checkpoints/last.ckpt)")
    dev = pick_device(device)
    out_map = Path(out)
    if out_map.suffix.lower() not in (".mrc", ".map"):
        raise InputError(f"--out {out}: give the map's file name, ending in .mrc")
    stem = out_map.with_suffix("")
    paths = {"map": out_map, "star": stem.with_suffix(".star"), "half1": Path(f"{stem}_half1.mrc"),
             "half2": Path(f"{stem}_half2.mrc"), "png": Path(f"{stem}_fsc.png"), "json": Path(f"{stem}_fsc.json")}
    if class_average:
        paths["classes"] = Path(f"{stem}_classes.mrcs")
    if method in ("moments", "learned"):
        del paths["star"]
    timings: dict[str, float] = {}
    start = time.perf_counter()
    finals = paths
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as publish:
        source = open_particle_input(star, Path(tmp), datadir, pixel_size, assume, strict)
        prepare_outputs(list(paths.values()), [Path(star), *(i.path for i in source.reader.infos)], overwrite)
        paths = publish.enter_context(output_set(finals, overwrite))  # written here, published on success
        for message in source.warnings:
            print(f"cryol reconstruct: warning: {message}", file=sys.stderr)
        n = len(source)
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, max_images, replace=False)) if max_images and max_images < n else np.arange(n)
        if box is not None and box > source.box:
            raise InputError(f"--box {box} is larger than the particles' box ({source.box}): reconstruct works at "
                             f"their box or below (Fourier downsampling); give at most {source.box}, or leave "
                             f"--box out ({DEFAULT_BOX} or the particles' box if smaller)")
        L = box or min(DEFAULT_BOX, source.box)
        if len(rows) < MIN_IMAGES[method]:
            raise InputError(f"{star}: {len(rows)} usable particle image(s); --method {method} needs at least "
                             f"{MIN_IMAGES[method]} (two half sets{' of common-line triplets' if method == 'common-lines' else ''})")
        processor = Preprocessor(PreprocessConfig(out_box=L if L != source.box else None), source.box)
        images, ctf, pixel = _load(source, rows, processor, dev)
        has_ctf = source.ctf_mode(processor.config) != "none"
        timings["read"] = time.perf_counter() - start

        if denoiser:
            t = time.perf_counter()
            images = _denoise(denoiser, images, source, rows, pixel, source.ctf_mode(processor.config), set_size, seed)
            timings["denoise"] = time.perf_counter() - t

        if method in ("moments", "learned"):
            report = _reconstruct_moments(images, ctf if has_ctf else None, source, rows, pixel, paths, reference,
                                          moments or MomentOptions(), seed, overwrite, learned=method == "learned")
            report.seconds = {**{k: round(v, 2) for k, v in timings.items()}, **report.seconds}
            report.map = str(finals["map"])
            with atomic_path(paths["json"], overwrite=True) as tmp_json:
                Path(tmp_json).write_text(json_text(report.__dict__))
            return report

        centres = torch.arange(len(rows), device=dev)
        if class_average:
            t = time.perf_counter()
            classes = class_averages(images, ctf if has_ctf else None, None if denoiser else 1.0,
                                     n_neighbors=n_neighbors, centres=n_classes)
            images, centres = classes.averages, classes.centres
            ctf = torch.ones_like(images)  # class averages are CTF-corrected
            has_ctf = False
            timings["class_average"] = time.perf_counter() - t
        t = time.perf_counter()
        lines_input = phase_flip(images, ctf) if has_ctf else images
        angles, _ = detect_common_lines(lines_input, n_angles=n_angles, max_radius=max_radius)
        sync = estimate_rotations(angles)
        rotations = sync.rotations.float()
        timings["orientations"] = time.perf_counter() - t

        report = ReconstructionReport(str(finals["map"]), str(finals["star"]), len(images), L, pixel)
        used_rows = rows[centres.cpu().numpy()]
        if reference:
            reg = register_rotations(rotations.double().cpu(), _true_rotations(source, used_rows, Path(star)))
            rotations = reg.aligned.float().to(dev)
            report.rotation_error_deg, report.reflected = reg.mean_error, reg.reflected

        t = time.perf_counter()
        subsets = torch.from_numpy(np.random.default_rng(seed + 1).permutation(len(images)) % 2 + 1).to(dev)
        recon_ctf = ctf if has_ctf else None
        halves = [reconstruct(images[subsets == k], rotations[subsets == k],
                              None if recon_ctf is None else recon_ctf[subsets == k], lam=lam,
                              iterations=iterations).volume for k in (1, 2)]
        volume = reconstruct(images, rotations, recon_ctf, lam=lam, iterations=iterations).volume
        timings["reconstruct"] = time.perf_counter() - t
        fsc_half = fourier_shell_correlation(halves[0], halves[1], 3)
        report.fsc_half = fsc_half.cpu().tolist()
        report.half_map_resolution_A = resolution_at(fsc_half, 0.143, L, pixel)
        curves = {"half maps": report.fsc_half}
        if reference:
            ref = require_cubic(read_map(reference))
            ref_volume = torch.as_tensor(ref.data, dtype=torch.float32, device=dev)
            if ref_volume.shape[-1] != L:
                ref_volume = fourier_resize(ref_volume, L, 3)
            fsc_ref = fourier_shell_correlation(volume, ref_volume, 3)
            report.fsc_reference = fsc_ref.cpu().tolist()
            report.reference_resolution_A = resolution_at(fsc_ref, 0.5, L, pixel)
            curves["map vs reference"] = report.fsc_reference

        write_map(paths["map"], volume.cpu(), pixel, overwrite=overwrite)
        for k, half in enumerate(halves, 1):
            write_map(paths[f"half{k}"], half.cpu(), pixel, overwrite=overwrite)
        if class_average:
            write_stack(paths["classes"], images.cpu(), pixel, overwrite=overwrite)
        _write_star(source, used_rows, rotations.cpu(), paths["star"], overwrite)
        fsc_plot(paths["png"], curves, L, pixel)
        report.seconds = {k: round(v, 2) for k, v in timings.items()}
        with atomic_path(paths["json"], overwrite=True) as tmp_json:
            Path(tmp_json).write_text(json_text(report.__dict__))
    return report


@dataclass
class MomentOptions:
    """Settings of ``--method moments`` (see :func:`~cryo_lightning.abinitio.moment_reconstruction.moments_reconstruct`)."""

    l_max: int = 3
    bandlimit: float = 0.25
    view_degree: int = 8
    ctf_groups: int = 4
    starts: int = 2
    iterations: tuple[int, ...] = (50, 200, 300)
    hops: int = 30
    checkpoint: str | None = None
    polish: int = 200
    prior_strength: float = 0.1
    newton: int = 20


def _defocus_groups(source: ParticleSource, rows: np.ndarray, ctf: torch.Tensor, n_groups: int):
    """Equal-count defocus bins and, per bin, the mean effective CTF as its representative."""
    df = source.table.particles.iloc[rows]
    defocus = torch.tensor(0.5 * (df["defocus_u_A"].to_numpy() + df["defocus_v_A"].to_numpy()), dtype=torch.float64)
    n_groups = max(1, min(n_groups, len(rows)))
    groups = defocus_bins(defocus, n_groups)
    reps = torch.stack([ctf.cpu().double()[groups == g].mean(0) for g in range(n_groups)])
    return groups, reps


def _present_groups(groups: torch.Tensor, reps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group labels renumbered over the groups a half set actually holds, and their representatives
    (with few particles, a random half can miss a defocus group)."""
    present, labels = torch.unique(groups, return_inverse=True)
    return labels, reps[present]


def _reconstruct_moments(images: torch.Tensor, ctf: torch.Tensor | None, source: ParticleSource, rows: np.ndarray,
                         pixel: float, paths: dict[str, Path], reference: str | None, opts: MomentOptions,
                         seed: int, overwrite: bool, learned: bool = False) -> ReconstructionReport:
    """``--method moments`` (or ``learned``): full and half-set moment fits, O(3)-aligned half maps, optional reference."""
    from cryo_lightning.abinitio.moment_reconstruction import moments_reconstruct
    from cryo_lightning.abinitio.volume_alignment import align_volumes
    from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
    from cryo_lightning.physics.noise import estimate_noise_variance

    t = time.perf_counter()
    L = images.shape[-1]
    x = images.detach().cpu().double()
    sigma2 = estimate_noise_variance(x)
    groups, reps = (None, None) if ctf is None else _defocus_groups(source, rows, ctf, opts.ctf_groups)
    subsets = torch.from_numpy(np.random.default_rng(seed + 1).permutation(len(x)) % 2)
    net = None
    if learned:  # Lightning is imported only for this method
        from cryo_lightning.tasks.learned_fit import LearnedFit

        net = LearnedFit(opts.checkpoint, L, opts.polish, opts.prior_strength, opts.hops, opts.newton)
    l_max, bandlimit = (net.l_max, net.bandlimit) if net else (opts.l_max, opts.bandlimit)
    fits = []
    for k, sel in enumerate([torch.ones(len(x), dtype=torch.bool), subsets == 0, subsets == 1]):
        print(f"cryol reconstruct: moment fit {['full set', 'half 1', 'half 2'][k]} ({int(sel.sum())} images)",
              file=sys.stderr)
        sub_groups, sub_reps = (None, None) if groups is None else _present_groups(groups[sel], reps)
        if net is not None:
            fits.append(net(x[sel], sigma2[sel], sub_reps, sub_groups, torch.Generator().manual_seed(seed + k)))
            continue
        fits.append(moments_reconstruct(
            x[sel], sigma2[sel], ctfs=sub_reps, groups=sub_groups, l_max=opts.l_max, bandlimit=opts.bandlimit,
            view_degree=opts.view_degree, n_starts=opts.starts, iterations=opts.iterations, hops=opts.hops,
            newton=opts.newton, generator=torch.Generator().manual_seed(seed + k)))
    basis = SphericalFourierBesselBasis(L, l_max=l_max, bandlimit=bandlimit)
    coeffs, dist, _, result = fits[0]
    report = ReconstructionReport(str(paths["map"]), "", len(x), L, pixel, method="learned" if learned else "moments",
                                  moment_loss=result.loss, viewing_coefficients=dist.coeffs.tolist())
    curves = {}
    if reference:
        ref = require_cubic(read_map(reference))
        ref_volume = torch.as_tensor(ref.data, dtype=torch.float64)
        if ref_volume.shape[-1] != L:
            ref_volume = fourier_resize(ref_volume, L, 3)
        ref_coeffs = basis.expand(ref_volume)
        al = align_volumes(basis, ref_coeffs, coeffs)
        coeffs = al.aligned
        # the map's scale is that of the normalised particles: compare after the best scalar factor
        scale = float(ref_coeffs @ coeffs) / max(float(coeffs @ coeffs), 1e-300)
        report.aligned_relative_error = float((ref_coeffs - scale * coeffs).norm() / ref_coeffs.norm())
        report.reflected = al.reflected
    volume = basis.evaluate(coeffs).float()
    halves = [basis.evaluate(align_volumes(basis, coeffs, h[0]).aligned).float() for h in fits[1:]]
    fsc_half = fourier_shell_correlation(halves[0], halves[1], 3)
    report.fsc_half = fsc_half.tolist()
    report.half_map_resolution_A = resolution_at(fsc_half, 0.143, L, pixel)
    curves["half maps (O(3)-aligned)"] = report.fsc_half
    if reference:
        fsc_ref = fourier_shell_correlation(volume, ref_volume.float(), 3)
        report.fsc_reference = fsc_ref.tolist()
        report.reference_resolution_A = resolution_at(fsc_ref, 0.5, L, pixel)
        curves["map vs reference"] = report.fsc_reference
    write_map(paths["map"], volume, pixel, overwrite=overwrite)
    for k, half in enumerate(halves, 1):
        write_map(paths[f"half{k}"], half, pixel, overwrite=overwrite)
    fsc_plot(paths["png"], curves, L, pixel)
    report.seconds = {"learned" if learned else "moments": round(time.perf_counter() - t, 2)}
    return report


def _write_star(source: ParticleSource, rows: np.ndarray, rotations: torch.Tensor, path: Path, overwrite: bool) -> None:
    """The particles used, with their original image names and the estimated Euler angles."""
    table = source.table.subset(rows)
    pixel = table.particles["pixel_size_A"].to_numpy()
    optics, particles = star_blocks_for_stack(table, "unused.mrcs", source.box, pixel)
    particles["rlnImageName"] = table.particles["image_name"].to_numpy()
    euler = matrix_to_euler(rotations.double()).numpy()
    particles["rlnAngleRot"], particles["rlnAngleTilt"], particles["rlnAnglePsi"] = euler.T
    write_particles_star(path, optics, particles, overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    """Parse ``cryol reconstruct`` arguments and run :func:`reconstruct_particles`."""
    p = tool_parser("cryol reconstruct", __doc__)
    p.add_argument("--star", required=True, help="particles: RELION .star, cryoSPARC .cs or a plain .mrcs stack")
    p.add_argument("--out", required=True, help="output map (.mrc); the STAR, half maps and FSC plot go beside it")
    p.add_argument("--method", type=str, default="common-lines", help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--box", type=PositiveInt | None, default=None,
                   help="work at this box size, at most the particles' (default: 64, or theirs if smaller)")
    p.add_argument("--max-images", type=PositiveInt | None, default=2000, help="random subset of this many particles")
    add_flag(p, "--class-average", False, "replace the particles by CTF-corrected class averages first")
    p.add_argument("--n-classes", type=PositiveInt | None, default=None, help="class averages to use (default: one per image)")
    p.add_argument("--n-neighbors", type=PositiveInt, default=10, help="images per class")
    p.add_argument("--denoiser", type=str | None, default=None,
                   help="denoise first with a shipped model (cryol models) or a cryol fit checkpoint")
    p.add_argument("--set-size", type=PositiveInt | None, default=None,
                   help="context set size for the denoiser (default: the model's)")
    p.add_argument("--reference", type=str | None, default=None,
                   help="ground-truth map (.mrc): FSC against it, after registering onto the STAR's angles")
    p.add_argument("--n-angles", type=PositiveInt, default=360, help="angular sampling of the common-line search")
    p.add_argument("--max-radius", type=float, default=0.4, help="fraction of Nyquist used for common lines")
    p.add_argument("--lam", type=float, default=1e-2, help="Tikhonov weight of the least-squares reconstruction")
    p.add_argument("--iterations", type=PositiveInt, default=30, help="conjugate-gradient iterations")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and of the half-map split")
    p.add_argument("--l-max", type=NonNegativeInt, default=3, help="moments: SFB degree of the map")
    p.add_argument("--bandlimit", type=float, default=0.25, help="moments: band limit, cycles/pixel")
    p.add_argument("--view-degree", type=NonNegativeInt, default=8, help="moments: even degree of the viewing distribution")
    p.add_argument("--ctf-groups", type=PositiveInt, default=4, help="moments: defocus groups")
    p.add_argument("--starts", type=PositiveInt, default=2, help="moments: random starts of the fit")
    p.add_argument("--fit-iterations", type=int, nargs="+", default=[50, 200, 300],
                   help="moments: L-BFGS iterations of the M1, M1+M2 and M1+M2+M3 stages")
    p.add_argument("--hops", type=NonNegativeInt, default=30,
                   help="moments: block basin hops after the best start (0: none); each costs about two fits' stages")
    p.add_argument("--newton", type=NonNegativeInt, default=20,
                   help="moments, learned: damped Newton steps that finish the fit (0: none); each costs one Hessian")
    p.add_argument("--checkpoint", type=str | None, default=None,
                   help="learned: ReconstructorTask checkpoint (box, l_max, band limit and viewing degree come from it)")
    p.add_argument("--polish", type=NonNegativeInt, default=200,
                   help="learned: L-BFGS iterations of the MAP moment loss after the network (0: network only)")
    p.add_argument("--prior-strength", type=float, default=0.1,
                   help="learned: weight of the learned coefficient prior, in units of the moments' sampling error")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    report = reconstruct_particles(
        args.star, args.out, args.method, args.box, args.max_images, args.class_average, args.n_classes,
        args.n_neighbors, args.denoiser, args.set_size, args.reference, args.n_angles, args.max_radius, args.lam,
        args.iterations, args.datadir, args.pixel_size, parse_assume(args.assume), args.device, args.overwrite,
        args.seed, MomentOptions(args.l_max, args.bandlimit, args.view_degree, args.ctf_groups, args.starts,
                                 tuple(args.fit_iterations), args.hops, args.checkpoint, args.polish,
                                 args.prior_strength, args.newton), args.strict)
    print(f"Wrote {report.map} ({report.n_images} images, box {report.box}, {report.pixel_size:.3f} A/px), "
          f"{report.star or 'the half maps'} and the FSC plot")
    if report.moment_loss is not None:
        print(f"Moment misfit {report.moment_loss:.3e}"
              + (f"; aligned relative error vs reference {report.aligned_relative_error:.3f}"
                 if report.aligned_relative_error is not None else ""))
    print(f"Half-map resolution (FSC 0.143): {report.half_map_resolution_A:.1f} A")
    if report.rotation_error_deg is not None:
        print(f"Mean rotation error vs the STAR's angles: {report.rotation_error_deg:.2f} deg "
              f"({'mirror image' if report.reflected else 'same hand'}); "
              f"resolution vs reference (FSC 0.5): {report.reference_resolution_A:.1f} A")
    print("Times (s): " + ", ".join(f"{k} {v}" for k, v in report.seconds.items()))
