"""The full forward model (projection, CTF, origin) against independent simulators' images."""

from __future__ import annotations

import mrcfile
import starfile
import torch

from cryo_lightning.physics.ctf import CTFParams, ctf_2d
from cryo_lightning.physics.fourier import fourier_resize
from cryo_lightning.physics.image_formation import clean_images
from cryo_lightning.physics.projection import volume_spectrum
from cryo_lightning.physics.rotations import euler_to_matrix


def _ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean((-1, -2), keepdim=True)
    b = b - b.mean((-1, -2), keepdim=True)
    return (a * b).sum((-1, -2)) / (a.norm(dim=(-1, -2)) * b.norm(dim=(-1, -2)))


def _angles(particles) -> torch.Tensor:
    return torch.tensor(particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(), dtype=torch.float64)


def test_aspire_simulation_has_the_opposite_ctf_sign(shared_data):
    """ASPIRE's CTF is minus RELION's: our CTF-affected projections anti-correlate with its clean stack."""
    folder = shared_data / "aspire_sim"
    blocks = starfile.read(folder / "particles.star", always_dict=True)
    optics, p = blocks["optics"], blocks["particles"].iloc[:12]
    with mrcfile.open(folder / "volume.mrc", permissive=True) as f:
        volume = torch.from_numpy(f.data.copy())
    with mrcfile.open(folder / "clean_ctf.mrcs", permissive=True) as f:
        reference = torch.from_numpy(f.data[:12].copy())
    columns = {c: p[c].to_numpy() for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")}
    columns.update({c: float(optics[c][0]) for c in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")})
    ctf = ctf_2d(CTFParams.from_dict(columns), 64, float(optics["rlnImagePixelSize"][0]))
    ours = clean_images(volume_spectrum(volume), euler_to_matrix(_angles(p)).float(), ctf)
    corr = _ncc(ours, reference)
    assert corr.max() <= -0.99, corr


def test_clean_images_origin_matches_relion_shifted_projections(shared_data):
    """clean_images places the particle at box centre - rlnOrigin, like relion_project."""
    folder = shared_data / "real" / "ASPIRE-Python"
    with mrcfile.open(folder / "clean70SRibosome_vol_65p.mrc", permissive=True) as f:
        volume = fourier_resize(torch.from_numpy(f.data.copy()), 64, 3)
    p = starfile.read(folder / "rln_proj_64_shifted.star", always_dict=True)["particles"]
    with mrcfile.open(folder / "rln_proj_64_shifted.mrcs", permissive=True) as f:
        reference = torch.from_numpy(f.data.copy())
    origins = torch.tensor(p[["rlnOriginX", "rlnOriginY"]].to_numpy(), dtype=torch.float32)
    rotations = euler_to_matrix(_angles(p)).float()
    shifted = clean_images(volume_spectrum(volume), rotations, origins=origins)
    assert _ncc(shifted, reference).min() >= 0.99
    wrong_sign = clean_images(volume_spectrum(volume), rotations, origins=-origins)
    assert _ncc(wrong_sign, reference).max() < 0.9
