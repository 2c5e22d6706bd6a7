"""``cryol simulate``: write a RELION 3.1 particle dataset simulated from a volume.

Example::

    cryol simulate --volume map.mrc --n-images 1000 --box 64 --pixel-size 4.0 --snr 0.1 --out sim/

writes into ``sim/``: ``particles.star`` (optics + particles blocks with the true angles, origins
and CTF), ``particles.mrcs`` (noisy images), ``particles_clean.mrcs`` (the noise-free,
CTF-affected images), ``volume.mrc`` (the volume at the requested box and pixel size) and
``simulation.json`` (the settings, the noise variance and the measured SNR).
"""

from __future__ import annotations

import math
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import get_type_hints

import mrcfile
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cryo_lightning.data.molecule_bank import derive_seed
from cryo_lightning.data.set_simulator import random_viewing_distribution
from cryo_lightning.io.atomic_write import atomic_path
from cryo_lightning.io.errors import InputError
from cryo_lightning.io.json_text import json_text
from cryo_lightning.io.mrc import StackWriter, write_map
from cryo_lightning.io.output_set import output_set
from cryo_lightning.io.particle_table import CS_RANGE_MM, MIN_DEFOCUS_A, VOLTAGE_RANGE_KV
from cryo_lightning.io.star import image_names, optics_block, write_particles_star
from cryo_lightning.io.volume_source import load_volume
from cryo_lightning.physics.ctf import ctf_2d, random_ctf_params
from cryo_lightning.physics.image_formation import clean_images
from cryo_lightning.physics.noise import disk_mask
from cryo_lightning.physics.projection import volume_spectrum
from cryo_lightning.physics.rotations import euler_to_matrix, matrix_to_euler, random_rotations
from cryo_lightning.tools.common import pick_device

__all__ = ["SimulateSettings", "simulate", "main"]


@dataclass
class SimulateSettings:
    """Settings of one simulated dataset (also written to ``simulation.json``)."""

    volume: str
    n_images: int
    box: int
    pixel_size: float
    snr: float
    out: str
    seed: int = 0
    ctf: bool = True
    defocus_min: float = 5000.0
    defocus_max: float = 25000.0
    max_astigmatism: float = 300.0
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    max_shift: float = 0.0
    viewing: str = "uniform"
    map_pixel_size: float | None = None
    resolution: float | None = None
    chunk_size: int = 256
    device: str = "auto"
    stem: str = "particles"
    overwrite: bool = False

    def validate(self) -> None:
        """Refuse settings that cannot make a valid dataset (the CTF ranges are those the
        particle readers accept, io/particle_table.py), each with the option's name and the fix.

        Raises:
            InputError: the first bad setting.
        """
        checks = [
            (self.n_images >= 1, f"--n-images must be >= 1, got {self.n_images}"),
            (self.box >= 8, f"--box must be >= 8 pixels, got {self.box}"),
            (math.isfinite(self.pixel_size) and self.pixel_size > 0,
             f"--pixel-size must be a positive number of Angstrom, got {self.pixel_size}"),
            (math.isfinite(self.snr) and self.snr > 0, f"--snr must be > 0, got {self.snr}"),
            (self.max_shift >= 0, f"--max-shift must be >= 0 pixels, got {self.max_shift}"),
            (self.chunk_size >= 1, f"--chunk-size must be >= 1, got {self.chunk_size}"),
        ]
        if self.ctf:
            lo, hi = VOLTAGE_RANGE_KV
            checks += [
                (self.defocus_min <= self.defocus_max, f"--defocus-min {self.defocus_min:g} is larger than "
                 f"--defocus-max {self.defocus_max:g}: swap them"),
                (self.defocus_min >= MIN_DEFOCUS_A, f"--defocus-min {self.defocus_min:g} A is below "
                 f"{MIN_DEFOCUS_A:g} A: the defocus is in Angstrom (did you mean micrometres? 1.5 um = 15000 A)"),
                (self.max_astigmatism >= 0, f"--max-astigmatism must be >= 0 A, got {self.max_astigmatism}"),
                (lo <= self.voltage <= hi, f"--voltage {self.voltage:g} is outside [{lo:g}, {hi:g}] kV"),
                (CS_RANGE_MM[0] <= self.cs <= CS_RANGE_MM[1],
                 f"--cs {self.cs:g} is outside [{CS_RANGE_MM[0]:g}, {CS_RANGE_MM[1]:g}] mm"),
                (0 <= self.amplitude_contrast <= 1,
                 f"--amplitude-contrast {self.amplitude_contrast:g} is not a fraction in [0, 1]"),
            ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    def resources(self) -> dict[str, int]:
        """Estimated peak memory and disk space of the run, in bytes.

        Memory: about 300 bytes per voxel of the volume (the 2x zero-padded complex spectrum and
        its gridding copies), 256 per pixel of a chunk of projections, 100 per image of poses and
        CTF parameters; measured peaks of the process less the interpreter, on this project's
        2-core machine (box 128 and 160, chunks 16 to 256), are within this estimate.
        Disk: the noisy and clean float32 stacks and the volume.
        """
        L = self.box
        return {"memory": 300 * L**3 + 256 * self.chunk_size * L**2 + 100 * self.n_images,
                "disk": 4 * (2 * self.n_images * L**2 + L**3)}

    def check_resources(self, available_memory: int | None = None, free_disk: int | None = None) -> None:
        """Refuse a run whose estimated memory or disk use (:meth:`resources`) exceeds what is
        available, before anything is written. ``None``: read from the system."""
        need = self.resources()
        if available_memory is None:
            available_memory = _available_memory()
        if free_disk is None:
            folder = Path(self.out).absolute()
            while not folder.exists():
                folder = folder.parent
            free_disk = shutil.disk_usage(folder).free
        gib = 2.0**30
        if available_memory is not None and need["memory"] > available_memory:
            raise InputError(f"--box {self.box} with --chunk-size {self.chunk_size} and --n-images {self.n_images} "
                             f"needs about {need['memory'] / gib:.1f} GiB of memory, but {available_memory / gib:.1f} "
                             "GiB are available; use a smaller --box or --chunk-size")
        if need["disk"] > free_disk:
            raise InputError(f"{self.n_images} images at box {self.box} need {need['disk'] / gib:.1f} GiB on disk "
                             f"(noisy and clean stacks), but {self.out} has {free_disk / gib:.1f} GiB free; "
                             "use fewer --n-images, a smaller --box or another --out")


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _outputs(s: SimulateSettings) -> dict[str, Path]:
    out = Path(s.out)
    return {
        "star": out / f"{s.stem}.star",
        "stack": out / f"{s.stem}.mrcs",
        "clean": out / f"{s.stem}_clean.mrcs",
        "volume": out / "volume.mrc",
        "settings": out / "simulation.json",
    }


def _draw_poses_and_ctf(s: SimulateSettings, device: torch.device):
    """Angles (N, 3) degrees, origins (N, 2) px and CTF parameters, all from one seeded generator."""
    g = torch.Generator().manual_seed(derive_seed(s.seed, 0))
    if s.viewing == "uniform":
        rotations = random_rotations(s.n_images, generator=g, dtype=torch.float64)
    elif s.viewing == "vmf":
        dist = random_viewing_distribution(3, (2.0, 10.0), g)
        rotations = dist.sample(s.n_images, generator=g, dtype=torch.float64)
    else:
        raise InputError(f"--viewing must be 'uniform' or 'vmf', got {s.viewing!r}")
    # The STAR angles are the record; the images are made from exactly these angles.
    angles = matrix_to_euler(rotations).round(decimals=6)
    origins = ((2 * torch.rand(s.n_images, 2, generator=g, dtype=torch.float64) - 1) * s.max_shift).round(decimals=6)
    params = random_ctf_params(
        s.n_images, generator=g, defocus_range=(s.defocus_min, s.defocus_max),
        max_astigmatism=s.max_astigmatism, voltage=s.voltage, cs=s.cs,
        amplitude_contrast=s.amplitude_contrast,
    ).to(dtype=torch.float64)  # so that the values rounded for the STAR file are exact
    params.defocus_u = params.defocus_u.round(decimals=2)
    params.defocus_v = params.defocus_v.round(decimals=2)
    params.defocus_angle = params.defocus_angle.round(decimals=2)
    return angles, origins, params


def _particles_table(s: SimulateSettings, angles: torch.Tensor, origins: torch.Tensor, params) -> pd.DataFrame:
    table = {
        "rlnImageName": image_names(_outputs(s)["stack"].name, s.n_images),
        "rlnOpticsGroup": np.ones(s.n_images, dtype=int),
        "rlnAngleRot": angles[:, 0].numpy(),
        "rlnAngleTilt": angles[:, 1].numpy(),
        "rlnAnglePsi": angles[:, 2].numpy(),
        "rlnOriginXAngst": origins[:, 0].numpy() * s.pixel_size,
        "rlnOriginYAngst": origins[:, 1].numpy() * s.pixel_size,
        "rlnRandomSubset": np.arange(s.n_images) % 2 + 1,
    }
    if s.ctf:
        for name, values in params.as_dict().items():
            if name not in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
                table[name] = values.numpy()
    return pd.DataFrame(table)


def simulate(s: SimulateSettings) -> dict[str, Path]:
    """Simulate the dataset described by ``s`` and write it atomically; returns the output paths."""
    s.validate()
    finals = _outputs(s)
    s.check_resources()
    device = pick_device(s.device)
    with output_set(finals, s.overwrite) as staged:  # refuses existing outputs before any work
        _simulate(s, staged, finals, device)
    return finals


def _simulate(s: SimulateSettings, paths: dict[str, Path], finals: dict[str, Path], device: torch.device) -> None:
    """Write the dataset's files to ``paths`` (staged), recording their final names ``finals``."""

    volume = load_volume(s.volume, s.box, s.pixel_size, s.map_pixel_size, s.resolution, s.seed)
    write_map(paths["volume"], volume, s.pixel_size, overwrite=s.overwrite)
    spectrum = volume_spectrum(volume.to(device))
    angles, origins, params = _draw_poses_and_ctf(s, device)
    rotations = euler_to_matrix(angles).float()

    # Pass 1: clean images, and the signal power that sets the noise level (DESIGN §3).
    mask = disk_mask(s.box, device=device)
    power_sum = 0.0
    chunks = [slice(i, min(i + s.chunk_size, s.n_images)) for i in range(0, s.n_images, s.chunk_size)]
    with StackWriter(paths["clean"], s.n_images, s.box, s.pixel_size, overwrite=s.overwrite) as writer:
        for sl in tqdm(chunks, desc="projecting", unit="chunk", disable=None):
            ctf = ctf_2d(params[sl].to(device, torch.float32), s.box, s.pixel_size) if s.ctf else None
            clean = clean_images(spectrum, rotations[sl].to(device), ctf, origins[sl].float().to(device))
            power_sum += float((clean.square() * mask).sum((-2, -1)).sum() / mask.sum())
            writer.write(clean.cpu())
    sigma2 = power_sum / s.n_images / s.snr

    # Pass 2: add white noise to the clean stack, chunk by chunk.
    g_noise = torch.Generator().manual_seed(derive_seed(s.seed, 1))
    noise_sq = 0.0
    with mrcfile.mmap(paths["clean"], mode="r", permissive=True) as clean_mrc, \
            StackWriter(paths["stack"], s.n_images, s.box, s.pixel_size, overwrite=s.overwrite) as writer:
        for sl in tqdm(chunks, desc="adding noise", unit="chunk", disable=None):
            clean = torch.from_numpy(np.array(clean_mrc.data[sl]))
            noise = torch.randn(clean.shape, generator=g_noise) * math.sqrt(sigma2)
            noise_sq += float(noise.double().square().mean((-2, -1)).sum())
            writer.write(clean + noise)

    optics = optics_block(s.pixel_size, s.box, s.voltage, s.cs, s.amplitude_contrast)
    write_particles_star(paths["star"], optics, _particles_table(s, angles, origins, params), s.overwrite)
    report = {
        "settings": asdict(s),
        "noise_variance": sigma2,
        "signal_power": power_sum / s.n_images,
        "measured_snr": power_sum / noise_sq,
        "snr_definition": "mean over images of the mean squared clean value inside the inscribed disk / noise variance",
        "outputs": {k: str(v) for k, v in finals.items()},
    }
    with atomic_path(paths["settings"], s.overwrite) as tmp:
        tmp.write_text(json_text(report, indent=2))


def _parser():
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    p = ArgumentParser(prog="cryol simulate", description=__doc__.split("\n\n")[0],
                       epilog="Example: cryol simulate --volume map.mrc --n-images 1000 --box 64 "
                              "--pixel-size 4.0 --snr 0.1 --out sim/")
    p.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options")
    d = SimulateSettings.__dataclass_fields__
    helps = {
        "volume": "MRC map, PDB/mmCIF model, or 'random' (a procedural molecule)",
        "n_images": "number of particle images", "box": "image and volume box size (pixels)",
        "pixel_size": "pixel size (Angstrom)", "snr": "signal-to-noise ratio (DESIGN §3 definition)",
        "out": "output folder", "seed": "random seed (poses, CTF, noise, random molecule)",
        "ctf": "apply a random CTF per image (RELION convention)",
        "defocus_min": "smallest mean defocus (Angstrom)", "defocus_max": "largest mean defocus (Angstrom)",
        "max_astigmatism": "largest DefocusU - DefocusV (Angstrom)", "voltage": "kV",
        "cs": "spherical aberration (mm)", "amplitude_contrast": "amplitude contrast fraction",
        "max_shift": "RELION origins uniform in [-max_shift, max_shift] pixels per axis",
        "viewing": "'uniform' or 'vmf' (a random non-uniform von Mises-Fisher mixture)",
        "map_pixel_size": "pixel size of the input map when its header has none (Angstrom)",
        "resolution": "rasterisation resolution of an atomic model (Angstrom; default 2 x pixel size)",
        "chunk_size": "images projected at a time", "device": "'auto', 'cpu' or 'cuda'",
        "stem": "file name stem of the STAR and stacks", "overwrite": "replace existing outputs",
    }
    required = {"volume", "n_images", "box", "pixel_size", "snr", "out"}
    for name, typ in get_type_hints(SimulateSettings).items():
        flag = "--" + name.replace("_", "-")
        if typ is bool:  # --ctf / --no-ctf, --overwrite / --no-overwrite
            p.add_argument(flag, action=ActionYesNo(no_prefix="no-"), default=d[name].default, help=helps[name])
        elif name in required:
            p.add_argument(flag, type=typ, required=True, help=helps[name])
        else:
            p.add_argument(flag, type=typ, default=d[name].default, help=helps[name])
    return p


def main(argv: list[str] | None = None) -> SimulateSettings:
    """Parse ``cryol simulate`` arguments and run :func:`simulate`."""
    parser = _parser()
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    ns_dict = {k: v for k, v in vars(ns).items() if k in SimulateSettings.__dataclass_fields__}
    settings = SimulateSettings(**ns_dict)
    paths = simulate(settings)
    print(f"Wrote {settings.n_images} images to {paths['stack']} (clean: {paths['clean'].name}), "
          f"STAR {paths['star']}, volume {paths['volume']}")
    return settings
