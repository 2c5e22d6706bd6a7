"""Simulates sets of noisy particle images of one molecule, on any device, reproducibly by seed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryo_lightning.data.molecule_bank import MoleculeBank
from cryo_lightning.physics.ctf import CTFParams, ctf_2d, random_ctf_params
from cryo_lightning.physics.image_formation import clean_images
from cryo_lightning.physics.noise import add_white_noise
from cryo_lightning.physics.projection import volume_spectrum
from cryo_lightning.physics.rotations import ViewingDistribution, random_rotations, sample_vmf

__all__ = ["SimulationConfig", "SetSimulator", "random_viewing_distribution"]


@dataclass
class SimulationConfig:
    """How a set of images is drawn.

    Attributes:
        set_size: images per set ``N``, or a list of sizes: each batch then draws one of them
            (from its first seed), so a set model learns to work across set sizes.
        pixel_size: Angstrom per pixel.
        snr: ``(low, high)``; each set's SNR is log-uniform in this range (DESIGN §3 definition).
        ctf: apply a random CTF per image (RELION convention) or not.
        defocus_range: Angstrom, mean defocus range of the random CTFs.
        max_astigmatism: Angstrom, largest ``DefocusU - DefocusV``.
        bfactor: ``(low, high)`` Angstrom^2, uniform per image (RELION ``rlnCtfBfactor``; positive
            values damp high frequencies as ``exp(-B s^2 / 4)``).
        amplitude_contrast: ``(low, high)``, uniform per set.
        voltages: kV; each set draws one.
        max_shift: pixels; RELION origins are uniform in ``[-max_shift, max_shift]`` per axis.
        viewing: ``"uniform"`` or ``"vmf"`` (a random mixture of von Mises-Fisher components per
            set, in-plane angle uniform: a non-uniform viewing distribution).
        vmf_components: components of the random mixture.
        vmf_kappa: ``(low, high)`` concentration range of the components.
        oversampling, interpolation: projector settings (see ``physics.projection``). Training
            defaults to ``"linear"``: RELION's own scheme (trilinear, 2x padding, sinc^2 gridding
            correction), several times faster than the more accurate ``"kaiser_bessel"``.
        normalize: divide noisy and clean images by the noise standard deviation, so that the
            noise has unit variance (as in RELION-normalised particles).
    """

    set_size: int | list[int] = 16
    pixel_size: float = 4.0
    snr: tuple[float, float] = (1 / 32, 1 / 32)
    ctf: bool = True
    defocus_range: tuple[float, float] = (5000.0, 25000.0)
    max_astigmatism: float = 300.0
    bfactor: tuple[float, float] = (0.0, 0.0)
    amplitude_contrast: tuple[float, float] = (0.1, 0.1)
    voltages: tuple[float, ...] = (300.0,)
    max_shift: float = 0.0
    viewing: str = "uniform"
    vmf_components: int = 3
    vmf_kappa: tuple[float, float] = (2.0, 10.0)
    oversampling: int = 2
    interpolation: str = "linear"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.viewing not in ("uniform", "vmf"):
            raise ValueError(f"viewing must be 'uniform' or 'vmf', got {self.viewing!r}")
        self.bfactor = tuple(float(b) for b in self.bfactor)
        self.amplitude_contrast = tuple(float(q) for q in self.amplitude_contrast)
        self.voltages = tuple(float(v) for v in self.voltages)
        lo, hi = self.snr
        if not 0 < lo <= hi:
            raise ValueError(f"snr range must satisfy 0 < low <= high, got {self.snr}")
        if not 0 <= self.amplitude_contrast[0] <= self.amplitude_contrast[1] < 1:
            raise ValueError(f"amplitude_contrast range must lie in [0, 1), got {self.amplitude_contrast}")
        if not 0 <= self.bfactor[0] <= self.bfactor[1]:
            raise ValueError(f"bfactor range must satisfy 0 <= low <= high, got {self.bfactor}")
        if not self.voltages or min(self.voltages) <= 0:
            raise ValueError(f"voltages must be positive kV, got {self.voltages}")


def random_viewing_distribution(
    components: int, kappa: tuple[float, float], generator: torch.Generator
) -> ViewingDistribution:
    """A random mixture of ``components`` vMF components (uniform means, log-uniform kappa)."""
    dev = generator.device
    means = sample_vmf(torch.tensor([0.0, 0.0, 1.0], device=dev), 0.0, components, generator=generator)
    lo, hi = math.log(kappa[0]), math.log(kappa[1])
    kappas = torch.exp(lo + (hi - lo) * torch.rand(components, generator=generator, device=dev))
    weights = torch.rand(components, generator=generator, device=dev) + 0.5
    return ViewingDistribution(weights / weights.sum(), means, kappas)


class SetSimulator:
    """Turns ``(seed, molecule index)`` pairs into batches of simulated image sets.

    All randomness of a set comes from one generator seeded with its seed on the target device,
    so a seed reproduces its set exactly on a given device type.
    """

    def __init__(self, bank: MoleculeBank, config: SimulationConfig) -> None:
        self.bank, self.config = bank, config

    @torch.no_grad()
    def __call__(
        self, seeds: torch.Tensor, molecules: torch.Tensor, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor | CTFParams | float]:
        """Simulate one set per ``(seed, molecule)``.

        Args:
            seeds: ``(B,)`` int64.
            molecules: ``(B,)`` int64 indices into the bank.
            device: where to simulate (default: the device of ``seeds``).
        Returns:
            dict with ``noisy`` and ``clean`` ``(B, N, L, L)`` float32 (clean = CTF-affected,
            noise-free target), ``rotations`` ``(B, N, 3, 3)``, ``origins`` ``(B, N, 2)`` pixels
            (RELION ``rlnOriginX/Y``), ``ctf`` ``(B, N, L, L)`` (ones if CTF is off),
            ``ctf_params`` (batch ``(B, N)``), ``snr`` ``(B,)``, ``noise_variance`` ``(B,)`` (in
            output units; 1 when normalised), ``molecule`` and ``seed`` ``(B,)``, ``pixel_size``
            (the configured float, or ``(B,)`` Angstrom when the bank gives each molecule its own).
        """
        cfg = self.config
        device = torch.device(device) if device is not None else seeds.device
        B, L = len(seeds), self.bank.box
        sizes = [cfg.set_size] if isinstance(cfg.set_size, int) else list(cfg.set_size)
        N = int(sizes[int(seeds[0]) % len(sizes)])
        volumes = self.bank.batch(molecules.tolist(), device)
        spectrum = volume_spectrum(volumes, cfg.oversampling, cfg.interpolation)

        rotations, origins, params, snrs, gens = [], [], [], [], []
        for seed in seeds.tolist():
            g = torch.Generator(device=device).manual_seed(int(seed))
            gens.append(g)
            if cfg.viewing == "uniform":
                rotations.append(random_rotations(N, generator=g, device=device))
            else:
                dist = random_viewing_distribution(cfg.vmf_components, cfg.vmf_kappa, g)
                rotations.append(dist.sample(N, generator=g, device=device))
            origins.append((2 * torch.rand(N, 2, generator=g, device=device) - 1) * cfg.max_shift)
            p = random_ctf_params(N, generator=g, defocus_range=cfg.defocus_range,
                                  max_astigmatism=cfg.max_astigmatism, device=device)
            if cfg.bfactor != (0.0, 0.0) or cfg.amplitude_contrast != (0.1, 0.1) or cfg.voltages != (300.0,):
                u = torch.rand(N + 2, generator=g, device=device)
                b_lo, b_hi = cfg.bfactor
                q_lo, q_hi = cfg.amplitude_contrast
                p.bfactor = b_lo + (b_hi - b_lo) * u[:N]
                p.amplitude_contrast = torch.full_like(p.voltage, q_lo + (q_hi - q_lo) * float(u[N]))
                p.voltage = torch.full_like(p.voltage, cfg.voltages[int(u[N + 1] * len(cfg.voltages)) % len(cfg.voltages)])
            params.append(p)
            lo, hi = math.log(cfg.snr[0]), math.log(cfg.snr[1])
            snrs.append(math.exp(lo + (hi - lo) * float(torch.rand(1, generator=g, device=device))))
        rot = torch.stack(rotations)
        orig = torch.stack(origins)
        ctf_params = CTFParams.stack(params)
        pixel_size: float | torch.Tensor = cfg.pixel_size
        if self.bank.pixel_size_range is not None:
            pixel_size = torch.tensor([self.bank.pixel_size(int(m)) for m in molecules.tolist()], device=device)
        ctf = (ctf_2d(ctf_params, L, pixel_size if isinstance(pixel_size, float) else pixel_size[:, None])
               if cfg.ctf else torch.ones(B, N, L, L, device=device))
        clean = clean_images(spectrum, rot, ctf, orig)

        noisy, sigma2 = [], []
        for b, g in enumerate(gens):
            n_b, s_b = add_white_noise(clean[b], snrs[b], generator=g, dim=-3)
            noisy.append(n_b)
            sigma2.append(s_b)
        noisy_t, sigma2_t = torch.stack(noisy), torch.stack(sigma2)
        if cfg.normalize:
            scale = sigma2_t.sqrt()[:, None, None, None]
            noisy_t, clean, sigma2_t = noisy_t / scale, clean / scale, torch.ones_like(sigma2_t)
        return {
            "noisy": noisy_t,
            "clean": clean,
            "rotations": rot,
            "origins": orig,
            "ctf": ctf,
            "ctf_params": ctf_params,
            "snr": torch.tensor(snrs, device=device),
            "noise_variance": sigma2_t,
            "molecule": molecules.to(device),
            "seed": seeds.to(device),
            "pixel_size": pixel_size,
        }
