"""Denoising of simulated projections of real maps: classical filters, the oracle and `cryol denoise` models.

Four public maps from ``../shared/data/real`` (70S ribosome, beta-galactosidase, the 3J9G helical
segment, EMD-3197), each put in a box of ``--box`` pixels (maps larger than the box are Fourier
downsampled, so their pixel size grows; smaller ones are zero padded at their own pixel size),
and optionally the independent ASPIRE simulation in ``../shared/data/aspire_sim``.

Per map, ``--n-images`` clean CTF-affected projections are simulated once with the project's
physics (Kaiser-Bessel Fourier-slice projector, RELION CTF, RELION origins): Haar-uniform
rotations (in-plane included), mean defocus uniform in 0.5-3.5 um, astigmatism uniform in
[0, 500] A at a uniform angle, 300 kV, Cs 2.7 mm, amplitude contrast 0.1, a B-factor uniform in
[0, 100] A^2 per image, origins uniform in [-2, 2] px per axis. For every SNR of ``--snrs``, white
Gaussian noise is added at the project's SNR (signal power inside the inscribed disk of the clean
images, over the whole stack, divided by the noise variance; physics/noise.py). The target is
the clean CTF-affected, shifted image. Rows, each the mean per-image relative MSE
``||x_hat - x||^2 / ||x||^2`` with a 95% interval over images (``1.96 std / sqrt(n)``):

- ``noisy``: the input;
- ``wiener``: the radial CTF-aware Wiener filter, the whole stack as one set, true noise variance;
- ``cwf``: the covariance Wiener filter, the whole stack as one set (B = 1, N = n_images), true
  noise variance, no population prior (wall time in the ``seconds`` column, without the one-off
  construction of the Fourier-Bessel basis, which is printed: ~2 s at L = 64, ~40 s at L = 128);
- ``em`` (with ``--em``): expectation maximisation over poses and shifts
  (abinitio/expectation_maximization.py), ab initio from random poses, on sets of ``--em-set-size``
  consecutive images (the stack in order, the last set taking what is left), true noise variance,
  a shift grid covering the simulation's origins, coarse to fine above 32 px (EM's default); each
  image's posterior mean given its set's map. No training data are involved: it is the 3D-consistent classical set method;
- one row per shipped model (``--models``; default: all that ``cryol models --json`` lists, when the
  command exists) and per checkpoint (``--ckpt [LABEL=]PATH``), run as a user runs them: the
  noisy stack is written as a RELION 3.1 STAR + MRCS (CTF columns, angles, origins), ``cryol
  denoise`` runs as a subprocess, and its output, which is in the units of the background-normalised
  particles (each image's mean and standard deviation of the pixels beyond 0.75 L / 2), is mapped
  back by the same per-image statistics of the written noisy images (``data.preprocess.
  background_stats``; at the model's box when the model downsamples, then Fourier-padded back to
  the simulation box). An identity checkpoint (a U-Net with a zero head) is run the same way once
  per map to check that this reproduces the ``noisy`` score (``--no-identity-check`` skips it);
- ``oracle``: the posterior mean given the true volume (denoise/oracle.py) over a Fibonacci grid
  of ``--oracle-rotations`` rotations with known origins and the amplitude fitted with the true
  rotations; trilinear slices of the 2x padded volume (the KB projector made the images; KB slices
  cost ~15x more). Its cost is the slicing of the grid (~100 s per map and SNR at the default 131,072
  rotations, L = 64, one idle core), nearly independent of the number of images; computed on the
  first ``--oracle-images`` images of each stack. At L = 64 the grid limits it (the posterior is
  sharper than the grid: 0.31 / 0.11 / 0.047 at 8k / 32k / 131k rotations, ribosome, SNR 1/8, 16
  images; 0.126 / 0.103 at 65k / 131k, SNR 1/16, 8 images), so the row is an upper bound on the
  exact posterior mean's error, loosest at the highest SNR.

Outputs: ``<out>.json`` (list of rows {map, box, pixel_size, snr, method, rel_mse, ci95, n_images,
seconds, ...}), ``<out>.md`` (a table per map, the machine, the command and the seeds) and
``<out>_<map>_gallery.png`` (clean | noisy | wiener | cwf | models | oracle at the SNR nearest 1/16).

    python benchmarks/realmaps.py                                  # every map, 1024 images, SNR 1/8 1/16 1/32
    python benchmarks/realmaps.py --ckpt unet=runs/denoise_unet_cpu/checkpoints/last.ckpt
    python benchmarks/realmaps.py --maps ribosome emd3197 --n-images 64 --snrs 0.0625 --no-oracle --out /tmp/rm
    python benchmarks/realmaps.py --maps ribosome betagal --snrs 0.0625 0.03125 --em --models --no-identity-check \
        --no-oracle --out benchmarks/results/realmaps_em
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryo_lightning.abinitio.expectation_maximization import expectation_maximization
from cryo_lightning.data.molecule_bank import derive_seed
from cryo_lightning.data.preprocess import background_stats
from cryo_lightning.denoise.cwf import cwf_denoise
from cryo_lightning.denoise.oracle import fit_scale, oracle_denoise
from cryo_lightning.denoise.wiener import wiener_denoise
from cryo_lightning.io.mrc import read_map, read_stack, require_cubic, write_stack
from cryo_lightning.io.star import image_names, optics_block, write_particles_star
from cryo_lightning.io.volume_source import load_volume
from cryo_lightning.metrics import relative_mse
from cryo_lightning.physics.ctf import CTFParams, ctf_2d, random_ctf_params
from cryo_lightning.physics.fourier import fourier_resize, radial_grid
from cryo_lightning.physics.image_formation import clean_images
from cryo_lightning.physics.noise import add_white_noise
from cryo_lightning.physics.projection import volume_spectrum
from cryo_lightning.physics.rotations import euler_to_matrix, matrix_to_euler, random_rotations
from cryo_lightning.physics.steerable_basis import fourier_bessel_basis
from cryo_lightning.physics.volumes import soft_sphere_mask
from cryo_lightning.tools.common import pick_device

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SNRS = (1 / 8, 1 / 16, 1 / 32)
# name -> (file under data/real, pixel size when the header has none, stable id for the seeds)
MAPS = {
    "ribosome": ("ASPIRE-Python/clean70SRibosome_vol_65p.mrc", 5.0, 1),  # relion_project --angpix 5
    "betagal": ("relion/ref_model.mrc", None, 2),
    "3j9g": ("cryojax/3j9g_potential_ps4_4.mrc", None, 3),
    "emd3197": ("mrcfile/EMD-3197.map", None, 4),
}
ASPIRE = "aspire_sim"  # 500 images at SNR 1/16, L = 64, 5 A, written by ASPIRE (its CTF sign is -RELION's)
ASPIRE_ID = 5
BFACTOR = (0.0, 100.0)
DEFOCUS = (5000.0, 35000.0)
MAX_ASTIGMATISM = 500.0
MAX_SHIFT = 2.0
VOLTAGE, CS, AMPLITUDE_CONTRAST = 300.0, 2.7, 0.1
BACKGROUND = 0.75  # the denoise CLI's background radius (fraction of L / 2)


@dataclass
class Stack:
    """One map's clean images and everything needed to write and score them."""

    name: str
    box: int
    pixel_size: float
    clean: torch.Tensor  # (N, L, L)
    ctf: torch.Tensor  # (N, L, L) RELION sign
    params: CTFParams  # float64, exactly as written to the STAR file
    angles: torch.Tensor  # (N, 3) degrees
    origins: torch.Tensor  # (N, 2) px, RELION sign
    volume: torch.Tensor | None  # (L, L, L) at pixel_size, for the oracle
    info: dict = field(default_factory=dict)
    fixed_snr: float | None = None  # ASPIRE: its own SNR and noisy images
    noisy: torch.Tensor | None = None
    noise_variance: float | None = None

    @property
    def rotations(self) -> torch.Tensor:
        return euler_to_matrix(self.angles).float()


def summary(values: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the 95% interval of the mean (normal approximation)."""
    v = values.double()
    n = v.numel()
    return float(v.mean()), float(1.96 * v.std() / math.sqrt(n)) if n > 1 else 0.0


def diameter_fraction(volume: torch.Tensor, level: float = 0.1) -> float:
    """Twice the largest distance from the box centre of a voxel above ``level`` times the map's
    maximum, over the box size (above 1: the particle reaches beyond the inscribed sphere)."""
    L = volume.shape[-1]
    inside = (volume > level * volume.max()).flatten()
    return float(2 * radial_grid(L, 3, device=volume.device).flatten()[inside].max() / L)


def edge_fraction(volume: torch.Tensor) -> float:
    """RMS of the map's six faces over its RMS: ~0 for an isolated particle, ~1 for a map filling its box."""
    faces = torch.cat([volume[0].flatten(), volume[-1].flatten(), volume[:, 0].flatten(), volume[:, -1].flatten(),
                       volume[:, :, 0].flatten(), volume[:, :, -1].flatten()])
    return float(faces.square().mean().sqrt() / volume.square().mean().sqrt().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# Maps and simulation


def load_map(name: str, data: Path, box: int) -> tuple[torch.Tensor, float, dict]:
    """The map in a ``box``: Fourier-downsampled when larger (pixel size grows), zero padded when smaller."""
    rel, header_free_pixel, _ = MAPS[name]
    path = data / "real" / rel
    m = require_cubic(read_map(path))
    source_pixel = m.pixel_size or header_free_pixel
    L_src = m.data.shape[-1]
    pixel = source_pixel * L_src / box if L_src > box else source_pixel
    volume = load_volume(path, box, pixel, map_pixel_size=source_pixel)
    edges = edge_fraction(m.data)
    mask = None
    if edges > 0.3:
        # A map that fills its own box (EMD-3197's faces carry 0.9 of its RMS) would project as a
        # sharp-edged cube: apply the soft spherical solvent mask a user would, inside the source
        # box (radius 0.8 of its half extent, raised-cosine edge over the remaining 0.2).
        half = 0.5 * L_src * source_pixel / pixel
        volume = volume * soft_sphere_mask(box, 0.8 * half, 0.2 * half, device=volume.device)
        mask = {"radius_px": round(0.8 * half, 2), "width_px": round(0.2 * half, 2)}
    info = {"file": str(path.relative_to(data.parent.parent)) if path.is_relative_to(data.parent.parent) else str(path),
            "source_box": L_src, "source_pixel_size": source_pixel, "header_pixel_size": m.pixel_size,
            "diameter_fraction": diameter_fraction(volume), "edge_fraction": edges, "solvent_mask": mask}
    return volume, pixel, info


def simulate_clean(name: str, volume: torch.Tensor, pixel: float, n: int, seed: int, device) -> Stack:
    """Clean CTF-affected images of ``volume``, poses, CTFs and origins drawn from one seeded generator."""
    L = volume.shape[-1]
    chunk = max(16, 256 * 64 * 64 // (L * L))  # the KB projector gathers 64 taps per sample
    g = torch.Generator().manual_seed(seed)
    # The STAR values are the record: the images are made from exactly the rounded values.
    angles = matrix_to_euler(random_rotations(n, generator=g, dtype=torch.float64)).round(decimals=6)
    origins = ((2 * torch.rand(n, 2, generator=g, dtype=torch.float64) - 1) * MAX_SHIFT).round(decimals=6)
    params = random_ctf_params(n, generator=g, defocus_range=DEFOCUS, max_astigmatism=MAX_ASTIGMATISM,
                               voltage=VOLTAGE, cs=CS, amplitude_contrast=AMPLITUDE_CONTRAST).to(dtype=torch.float64)
    params.bfactor = (BFACTOR[0] + (BFACTOR[1] - BFACTOR[0]) * torch.rand(n, generator=g, dtype=torch.float64))
    for f in ("defocus_u", "defocus_v", "defocus_angle", "bfactor"):
        setattr(params, f, getattr(params, f).round(decimals=2))
    spectrum = volume_spectrum(volume.to(device))  # Kaiser-Bessel, 2x oversampling: as cryol simulate
    rotations = euler_to_matrix(angles).float()
    ctf = ctf_2d(params.to(device, torch.float32), L, pixel)
    clean = torch.cat([clean_images(spectrum, rotations[i:i + chunk].to(device), ctf[i:i + chunk],
                                    origins[i:i + chunk].float().to(device)) for i in range(0, n, chunk)])
    return Stack(name, L, pixel, clean, ctf, params, angles, origins, volume.to(device))


def load_aspire(data: Path, n: int, device) -> Stack:
    """The ASPIRE simulation, sign-flipped to RELION's convention (ASPIRE's CTF is -RELION's)."""
    from cryo_lightning.data.particle_source import open_particles

    folder = data / ASPIRE
    source = open_particles(folder / "particles.star")
    n = min(n, len(source))
    rows = np.arange(n)
    df = source.table.particles.iloc[rows]
    noisy = -torch.from_numpy(np.asarray(source.read(rows), dtype=np.float32))
    clean = -read_stack(folder / "clean_ctf.mrcs")[:n].float()
    pixel, L = float(df["pixel_size_A"].median()), source.box
    params = CTFParams(**{f: torch.tensor(df[c].to_numpy(np.float64)) for f, c in (
        ("defocus_u", "defocus_u_A"), ("defocus_v", "defocus_v_A"), ("defocus_angle", "defocus_angle_deg"),
        ("voltage", "voltage_kV"), ("cs", "cs_mm"), ("amplitude_contrast", "amp_contrast"),
        ("phase_shift", "phase_shift_deg"), ("bfactor", "ctf_bfactor_A2"), ("scale", "ctf_scale"))})
    angles = torch.tensor(df[["rot_deg", "tilt_deg", "psi_deg"]].to_numpy(np.float64))
    origins = torch.tensor(df[["shift_x_A", "shift_y_A"]].to_numpy(np.float64)) / pixel
    volume = read_map(folder / "volume.mrc").data.float()
    volume = volume.reshape(volume.shape[-3:])  # ASPIRE writes a (1, L, L, L) volume stack
    sigma2 = float((noisy - clean).double().square().mean())  # the realised noise variance
    info = {"file": f"shared/data/{ASPIRE}", "source_box": L, "source_pixel_size": pixel, "header_pixel_size": pixel,
            "diameter_fraction": diameter_fraction(volume), "edge_fraction": edge_fraction(volume)}
    return Stack(ASPIRE, L, pixel, clean.to(device), ctf_2d(params.to(device, torch.float32), L, pixel), params,
                 angles, origins, volume.to(device), info, fixed_snr=1 / 16, noisy=noisy.to(device),
                 noise_variance=sigma2)


def add_noise(stack: Stack, snr: float, seed: int) -> tuple[torch.Tensor, float]:
    """White noise at the project's SNR (disk power of the whole stack / noise variance)."""
    if stack.noisy is not None:
        return stack.noisy, stack.noise_variance
    g = torch.Generator().manual_seed(seed)
    noisy, sigma2 = add_white_noise(stack.clean[None], snr, generator=g)
    return noisy[0], float(sigma2)


# ---------------------------------------------------------------------------------------------
# The user path: STAR + MRCS -> cryol denoise -> back to the clean images' units


def write_dataset(stack: Stack, noisy: torch.Tensor, folder: Path) -> Path:
    """A RELION 3.1 STAR (optics + particles: names, angles, origins in A, CTF) and the noisy MRCS."""
    folder.mkdir(parents=True, exist_ok=True)
    n = noisy.shape[0]
    write_stack(folder / "particles.mrcs", noisy.cpu(), stack.pixel_size, overwrite=True)
    table = {
        "rlnImageName": image_names("particles.mrcs", n),
        "rlnOpticsGroup": np.ones(n, dtype=int),
        "rlnAngleRot": stack.angles[:, 0].numpy(),
        "rlnAngleTilt": stack.angles[:, 1].numpy(),
        "rlnAnglePsi": stack.angles[:, 2].numpy(),
        "rlnOriginXAngst": stack.origins[:, 0].numpy() * stack.pixel_size,
        "rlnOriginYAngst": stack.origins[:, 1].numpy() * stack.pixel_size,
        "rlnRandomSubset": np.arange(n) % 2 + 1,
    }
    for name, values in stack.params.as_dict().items():
        if name not in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):  # in the optics block
            table[name] = values.numpy()
    optics = optics_block(stack.pixel_size, stack.box, float(stack.params.voltage[0]), float(stack.params.cs[0]),
                          float(stack.params.amplitude_contrast[0]))
    return write_particles_star(folder / "particles.star", optics, pd.DataFrame(table), overwrite=True)


def cryol_command() -> list[str]:
    exe = Path(sys.executable).with_name("cryol")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "cryo_lightning"]


def shipped_models() -> list[str]:
    """Names of the shipped models: ``cryol models --json`` when the command exists, else none."""
    try:
        out = subprocess.run([*cryol_command(), "models", "--json"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    try:
        cards = json.loads(out.stdout)
    except json.JSONDecodeError:
        return []
    if isinstance(cards, dict):
        cards = cards.get("models", list(cards.values()) if all(isinstance(v, dict) for v in cards.values()) else [])
    return [c["name"] if isinstance(c, dict) else str(c) for c in cards]


def identity_checkpoint(path: Path) -> Path:
    """A `cryol fit`-style DenoiseTask checkpoint whose U-Net has a zero head: exactly the identity."""
    import lightning

    from cryo_lightning.models.unet import UNet

    net = UNet(depth=1, channels=1)
    state = {f"net.{k}": (torch.zeros_like(v) if k.startswith("head.") else v) for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 0,
                "hyper_parameters": {
                    "_class_path": "cryo_lightning.tasks.denoise.DenoiseTask",
                    "net": {"class_path": "cryo_lightning.models.unet.UNet",
                            "init_args": {"depth": 1, "channels": 1, "in_channels": 1}},
                    "_instantiator": "lightning.pytorch.cli.instantiate_module"}}, path)
    return path


def run_cli(star: Path, out: Path, model: tuple[str, str], args) -> tuple[torch.Tensor, float]:
    """``cryol denoise`` on ``star`` (``model`` = ("--model", NAME) or ("--ckpt", PATH)); the raw output stack."""
    cmd = [*cryol_command(), "denoise", "--star", str(star), "--out", str(out), *model, "--overwrite",
           *(["--set-size", str(args.set_size)] if args.set_size else []), "--device", args.denoise_device]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return read_stack(out / f"{star.stem}.mrcs").float(), seconds


def to_clean_units(denoised: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """Undo the denoise CLI's per-particle background normalisation.

    The CLI Fourier-resizes the particles to the model's box (when it has one) and divides
    ``x - mean`` by the background standard deviation; the same statistics of the written noisy
    images map its output back. An output at a smaller box is Fourier-padded back to the input box
    (the frequencies it dropped count as error).
    """
    L, L_out = noisy.shape[-1], denoised.shape[-1]
    reference = noisy if L_out == L else fourier_resize(noisy, L_out, 2)
    mean, std = background_stats(reference.float(), BACKGROUND)
    x = denoised.to(noisy.device) * std + mean
    return x if L_out == L else fourier_resize(x, L, 2)


# ---------------------------------------------------------------------------------------------
# The benchmark


def snr_label(snr: float) -> str:
    inv = 1 / snr
    return f"1/{inv:.0f}" if abs(inv - round(inv)) < 1e-6 else f"{snr:g}"


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        name = fields.get("Model name", name).strip()
        cpus = fields.get("CPU(s)", "").strip()
        name = f"{name} ({cpus} CPUs)" if cpus else name
    except (OSError, subprocess.TimeoutExpired):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{name}{gpu}; {platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--maps", nargs="+", default=[*MAPS, ASPIRE], choices=[*MAPS, ASPIRE])
    p.add_argument("--box", type=int, default=64, help="box size L (64 or 128)")
    p.add_argument("--n-images", type=int, default=1024, help="images per map (ASPIRE: at most 500)")
    p.add_argument("--snrs", type=float, nargs="+", default=list(SNRS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="*", default=None,
                   help="shipped model names for `cryol denoise --model` (default: all that `cryol models --json` lists)")
    p.add_argument("--ckpt", nargs="*", default=[], help="[LABEL=]PATH checkpoints for `cryol denoise --ckpt`")
    p.add_argument("--set-size", type=int, default=None,
                   help="`cryol denoise --set-size` (default: none given, so each model's own)")
    p.add_argument("--denoise-device", default="auto", help="`cryol denoise --device`")
    p.add_argument("--device", default="auto", help="device of the simulation, classical filters and oracle")
    p.add_argument("--no-wiener", action="store_true")
    p.add_argument("--no-cwf", action="store_true")
    p.add_argument("--no-oracle", action="store_true")
    p.add_argument("--em", action="store_true", help="add the em row (slow: minutes per set of 512 at L = 64)")
    p.add_argument("--em-set-size", type=int, default=512)
    p.add_argument("--em-iterations", type=int, default=15)
    p.add_argument("--em-rotations", type=int, default=4608)
    p.add_argument("--oracle-rotations", type=int, default=131072,
                   help="Fibonacci SO(3) grid size; the cost is the slicing, ~100 s per map and SNR at L = 64 on one "
                        "idle core (twice that on a loaded one), linear in the size, x4 at L = 128 (which also needs "
                        "~8x the rotations). The grid limits the row at L = 64: ribosome, SNR 1/8, 16 images: 0.31 / "
                        "0.11 / 0.047 at 8k / 32k / 131k rotations; SNR 1/16, 8 images: 0.126 / 0.103 at 65k / 131k")
    p.add_argument("--oracle-images", type=int, default=64, help="the oracle row uses the first this many images")
    p.add_argument("--no-identity-check", action="store_true")
    p.add_argument("--gallery-images", type=int, default=6)
    p.add_argument("--data", type=Path, default=DATA, help="the shared data folder (holds real/ and aspire_sim/)")
    p.add_argument("--workdir", type=Path, default=None, help="where the STAR/MRCS inputs go (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "realmaps", help="results stem")
    args = p.parse_args()
    device = pick_device(args.device)
    stem = args.out
    stem.parent.mkdir(parents=True, exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="realmaps_"))
    work.mkdir(parents=True, exist_ok=True)

    names = shipped_models() if args.models is None else args.models
    models = [(n, ("--model", n)) for n in names]
    for item in args.ckpt:
        label, _, path = item.rpartition("=")
        path_ = Path(path)
        label = label or (path_.parent.parent.name if path_.parent.name == "checkpoints" else path_.stem)
        models.append((label, ("--ckpt", str(path_.resolve()))))
    identity = None if args.no_identity_check else identity_checkpoint(work / "identity.ckpt")
    print(f"machine: {machine()}")
    print(f"models: {[m[0] for m in models] or 'none'}; work folder {work}", flush=True)

    rows: list[dict] = []
    bases: dict = {}
    meta: dict[str, dict] = {}
    seeds: dict[str, dict] = {}
    t_all = time.perf_counter()
    for name in args.maps:
        t0 = time.perf_counter()
        if name == ASPIRE:
            if args.box != 64:
                print(f"[{name}] skipped: it is a fixed 64-pixel stack (--box {args.box})")
                continue
            stack = load_aspire(args.data, args.n_images, device)
            snrs = [stack.fixed_snr]
            seeds[name] = {"note": "ASPIRE's own seeds (2024); no noise drawn here"}
        else:
            volume, pixel, info = load_map(name, args.data, args.box)
            sim_seed = derive_seed(args.seed, MAPS[name][2], 0)
            stack = simulate_clean(name, volume, pixel, args.n_images, sim_seed, device)
            stack.info = info
            snrs = args.snrs
            seeds[name] = {"poses_ctf_shifts": sim_seed}
        n = stack.clean.shape[0]
        meta[name] = {"box": stack.box, "pixel_size": stack.pixel_size, "n_images": n, **stack.info}
        print(f"[{name}] {stack.info['file']}: {stack.info['source_box']}^3 at {stack.info['source_pixel_size']:.3f} A "
              f"-> box {stack.box} at {stack.pixel_size:.3f} A; particle diameter {stack.info['diameter_fraction']:.2f} "
              f"of the box (voxels above 10% of the maximum); map faces RMS / map RMS {stack.info['edge_fraction']:.2f}; "
              f"{n} clean images in {time.perf_counter() - t0:.1f} s", flush=True)
        gallery_snr = min(snrs, key=lambda s: abs(math.log(s * 16)))
        gallery: dict[str, torch.Tensor] = {}
        oracle_spectrum = None
        for snr in snrs:
            k = round(1e4 / snr)
            noise_seed = derive_seed(args.seed, MAPS[name][2] if name in MAPS else ASPIRE_ID, 1, k)
            if name in MAPS:
                seeds[name][f"noise_snr_{snr_label(snr)}"] = noise_seed
            noisy, sigma2 = add_noise(stack, snr, noise_seed)
            tag = f"[{name} SNR {snr_label(snr)}]"

            def record(method: str, est: torch.Tensor, seconds: float, target: torch.Tensor | None = None, **extra):
                err = relative_mse(est, stack.clean if target is None else target)
                mean, ci = summary(err)
                rows.append({"map": name, "box": stack.box, "pixel_size": stack.pixel_size, "snr": snr, "method": method,
                             "rel_mse": mean, "ci95": ci, "n_images": int(err.numel()), "seconds": seconds, **extra})
                print(f"{tag} {method}: {mean:.4f} +- {ci:.4f} ({err.numel()} images, {seconds:.1f} s)", flush=True)
                if snr == gallery_snr:
                    gallery[method] = est[: args.gallery_images].detach().cpu()

            record("noisy", noisy, 0.0, noise_variance=sigma2)
            if not args.no_wiener:
                t = time.perf_counter()
                out = wiener_denoise(noisy[None], stack.ctf[None], sigma2)[0]
                record("wiener", out, time.perf_counter() - t)
            if not args.no_cwf:
                if stack.box not in bases:  # built once per box and cached by the library; kept out of the timing
                    t = time.perf_counter()
                    bases[stack.box] = fourier_bessel_basis(stack.box, noisy.device, torch.float32)
                    print(f"{tag} CWF: Fourier-Bessel basis for L = {stack.box} built in {time.perf_counter() - t:.1f} s "
                          "(once per box, not in the cwf time)", flush=True)
                t = time.perf_counter()
                out = cwf_denoise(noisy[None], stack.ctf[None], sigma2, basis=bases[stack.box])[0]
                record("cwf", out, time.perf_counter() - t)
            if args.em:
                t = time.perf_counter()
                parts = []
                for i, start in enumerate(range(0, n, args.em_set_size)):
                    part = slice(start, min(n, start + args.em_set_size))
                    if part.stop - part.start < 2:
                        break
                    found = expectation_maximization(
                        noisy[part][None], stack.ctf[part][None], sigma2, iterations=args.em_iterations,
                        n_rotations=args.em_rotations, max_shift=MAX_SHIFT,
                        generator=torch.Generator().manual_seed(derive_seed(args.seed, 2, i)))
                    parts.append(found.denoised[0])
                record("em", torch.cat(parts), time.perf_counter() - t, target=stack.clean[: sum(len(q) for q in parts)],
                       set_size=args.em_set_size, em_iterations=args.em_iterations, em_rotations=args.em_rotations)
            if models or identity is not None:
                folder = work / name / f"snr_{k}"
                star = write_dataset(stack, noisy, folder)
                if identity is not None and snr == snrs[0]:
                    raw, seconds = run_cli(star, folder / "identity", ("--ckpt", str(identity)), args)
                    back = to_clean_units(raw, noisy)
                    deviation = float((back - noisy).abs().max() / math.sqrt(sigma2))
                    record("identity_check", back, seconds, max_deviation_over_sigma=deviation)
                    ok = deviation < 1e-3
                    print(f"{tag} identity check via cryol denoise: max |rescaled - noisy| / sigma = {deviation:.2e} "
                          f"({'OK' if ok else 'MISMATCH: the rescaling convention is wrong'})", flush=True)
                for label, option in models:
                    raw, seconds = run_cli(star, folder / label.replace("/", "_"), option, args)
                    record(label, to_clean_units(raw, noisy), seconds, model=f"{option[0]} {option[1]}",
                           output_box=int(raw.shape[-1]))
            if not args.no_oracle and stack.volume is not None:
                m = min(args.oracle_images, n)
                if oracle_spectrum is None:  # trilinear slices (KB slices cost ~15x more)
                    oracle_spectrum = volume_spectrum(stack.volume, 2, "linear")
                rot, ctf, org = stack.rotations[:m].to(device)[None], stack.ctf[:m][None], stack.origins[:m].float().to(device)[None]
                t = time.perf_counter()
                scale = fit_scale(stack.clean[:m][None], oracle_spectrum, rot, ctf, org)
                out = oracle_denoise(noisy[:m][None], ctf, sigma2, oracle_spectrum, scale=scale,
                                     n_rotations=args.oracle_rotations, origins=org)[0]
                record("oracle", out, time.perf_counter() - t, target=stack.clean[:m],
                       oracle_rotations=args.oracle_rotations, oracle_scale=float(scale), subset=f"first {m} images")
            if snr == gallery_snr:
                gallery = {"clean": stack.clean[: args.gallery_images].cpu(), **gallery}
        plot_gallery(gallery, stem.with_name(f"{stem.name}_{name}_gallery.png"), name, gallery_snr)
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)

    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    write_table(rows, meta, seeds, args, stem.with_suffix(".md"), [m[0] for m in models])
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')} and the galleries "
          f"({time.perf_counter() - t_all:.0f} s in all)")


def plot_gallery(images: dict[str, torch.Tensor], path: Path, name: str, snr: float) -> None:
    """Rows clean | noisy | wiener | cwf | models | oracle (each image contrast-stretched on its own)."""
    from cryo_lightning.plots import save_grid_png
    from cryo_lightning.tasks.image_grid import image_grid

    order = ["clean", "noisy", "wiener", "cwf"]
    labels = [k for k in order if k in images] + [k for k in images if k not in order and k not in ("oracle", "identity_check")]
    labels += ["oracle"] if "oracle" in images else []
    count = min(v.shape[0] for v in images.values())
    grid = image_grid([images[k][:count] for k in labels], count)
    save_grid_png(path, grid, [f"{k}" if k != "noisy" else f"noisy {snr_label(snr)}" for k in labels])


def write_table(rows: list[dict], meta: dict, seeds: dict, args, path: Path, models: list[str]) -> None:
    lines = [
        "# Denoising simulated projections of real maps",
        "",
        f"Command: `{shlex.join(['python', *sys.argv])}`",
        "",
        f"Machine: {machine()}.",
        "",
        "Mean per-image relative MSE `||x_hat - x||^2 / ||x||^2` against the clean CTF-affected, shifted images, "
        "+- the 95% interval of the mean over images (1.96 std / sqrt(n)). Simulation: Kaiser-Bessel Fourier-slice "
        "projector (2x oversampling), Haar-uniform rotations, RELION CTF (mean defocus U[0.5, 3.5] um, astigmatism "
        f"U[0, {MAX_ASTIGMATISM:.0f}] A at a uniform angle, {VOLTAGE:.0f} kV, Cs {CS} mm, amplitude contrast "
        f"{AMPLITUDE_CONTRAST}, B-factor U[{BFACTOR[0]:.0f}, {BFACTOR[1]:.0f}] A^2 per image), origins "
        f"U[-{MAX_SHIFT:.0f}, {MAX_SHIFT:.0f}] px per axis, white Gaussian noise at the project's SNR (disk power of the "
        "clean stack / noise variance). Wiener and CWF see the whole stack as one set with the true noise variance. "
        "Models run through `cryol denoise"
        + (f" --set-size {args.set_size}" if args.set_size else "") + "` (context sets: "
        + (f"{args.set_size} images" if args.set_size else "each model's own size, `cryol models`")
        + ") on a RELION 3.1 STAR + MRCS of the noisy "
        "stack; their background-normalised output is mapped back with each particle's background mean and standard "
        f"deviation (beyond {BACKGROUND} L / 2) of the written noisy image; their seconds are the subprocess's wall time, "
        "start-up included (~10 s here). Seconds of several SNRs are listed in SNR order. The oracle is the posterior mean given the "
        f"true volume over a Fibonacci grid of {args.oracle_rotations} rotations (trilinear slices, known origins, "
        f"amplitude fitted with the true rotations) on the first {args.oracle_images} images of each stack only; the "
        "grid limits it at L = 64, so it is an upper bound on the exact posterior mean's error."
        + (f" EM (`--em`) runs ab initio on sets of {args.em_set_size} consecutive images with the true noise "
           f"variance: {args.em_iterations} iterations over {args.em_rotations} rotations and a 1-px shift grid "
           f"within +-{MAX_SHIFT:.0f} px (boxes above 32: the iterations on images cropped to 32 px, then 5 at the "
           "full box from the best coarse poses, EM's default); each image's posterior mean given its set's map."
           if args.em else ""),
        "",
        f"Seeds (base `--seed {args.seed}`, derived with `derive_seed`): "
        + "; ".join(f"{m}: " + ", ".join(f"{k} {v}" for k, v in s.items()) for m, s in seeds.items()) + ".",
        "",
    ]
    for name, info in meta.items():
        mine = [r for r in rows if r["map"] == name]
        snrs = list(dict.fromkeys(r["snr"] for r in mine))
        methods = [m for m in dict.fromkeys(r["method"] for r in mine) if m != "identity_check"]
        lines += [f"## {name}", "",
                  f"`{info['file']}` ({info['source_box']}^3 at {info['source_pixel_size']:.3f} A) in a box of "
                  f"{info['box']} at {info['pixel_size']:.3f} A; particle diameter {info['diameter_fraction']:.2f} of "
                  f"the box (voxels above 10% of the maximum); faces RMS / map RMS {info['edge_fraction']:.2f}; "
                  f"{info['n_images']} images.", ""]
        if name == ASPIRE:
            lines += ["ASPIRE's images and clean images, negated to RELION's sign (ASPIRE's CTF is the negative of "
                      "RELION's); its own SNR 1/16 and noise, the realised noise variance given to Wiener and CWF.", ""]
        lines += ["| method | " + " | ".join(f"SNR {snr_label(s)}" for s in snrs) + " | seconds |",
                  "|---|" + "---|" * (len(snrs) + 1)]
        for m in methods:
            cells, secs = [], []
            for s in snrs:
                r = next((r for r in mine if r["method"] == m and r["snr"] == s), None)
                cells.append(f"{r['rel_mse']:.3f} +- {r['ci95']:.3f}" if r else "-")
                secs.append(f"{r['seconds']:.1f}" if r else "-")
            label = f"{m} ({mine[[r['method'] for r in mine].index(m)]['subset']})" if m == "oracle" else m
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {' / '.join(secs)} |")
        check = [r for r in mine if r["method"] == "identity_check"]
        for r in check:
            noisy = next(x for x in mine if x["method"] == "noisy" and x["snr"] == r["snr"])
            lines += ["", f"Identity check (a zero-head U-Net through `cryol denoise`, rescaled): {r['rel_mse']:.4f} vs "
                          f"noisy {noisy['rel_mse']:.4f} at SNR {snr_label(r['snr'])}; max |rescaled - noisy| / sigma = "
                          f"{r['max_deviation_over_sigma']:.1e}."]
        lines.append("")
    if not models:
        lines += ["No model rows: no shipped models were listed and no `--ckpt` was given.", ""]
    path.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
