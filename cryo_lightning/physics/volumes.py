"""Synthetic volumes: procedural random molecules, Gaussian rasterisation, resampling, masks.

Conventions (docs/conventions.md): volumes are ``(L, L, L)`` float32 indexed ``(z, y, x)``;
the centre is index ``L // 2`` on every axis; point coordinates are ``(x, y, z)`` vectors.
A point at ``(x, y, z)`` pixels from the centre lands at array index
``[L//2 + z, L//2 + y, L//2 + x]``.

Gaussian width and resolution: a map at resolution ``R`` Angstrom is modelled by Gaussians of
standard deviation ``sigma = R / (pi * sqrt(2)) ~= 0.225 R`` (the default of ChimeraX
``molmap``): the Gaussian's Fourier transform ``exp(-2 pi^2 sigma^2 s^2)`` falls to ``1/e`` at
``s = 1 / R``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryo_lightning.physics.fourier import fourier_resize, radial_grid

__all__ = [
    "random_molecule",
    "gaussian_density",
    "resolution_to_sigma",
    "resample_volume",
    "center_crop_or_pad",
    "soft_sphere_mask",
]

# Gaussians are evaluated out to this many standard deviations per axis; the mass lost outside
# the window is about 3 * erfc(4.5 / sqrt(2)) ~ 2e-5 of each Gaussian.
_TRUNCATE_SIGMAS = 4.5
# Upper bound on the number of window samples held in memory at once while splatting.
_CHUNK_SAMPLES = 1 << 22


def resolution_to_sigma(resolution_A: float) -> float:
    """Gaussian standard deviation (Angstrom) used to model a map at ``resolution_A`` Angstrom.

    ``sigma = resolution / (pi * sqrt(2))``, see the module docstring.
    """
    return resolution_A / (math.pi * math.sqrt(2.0))


def _splat_gaussians(
    positions: torch.Tensor,
    weights: torch.Tensor,
    sigma: float,
    L: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sum of isotropic Gaussians sampled on the voxel grid, in pixel units.

    Args:
        positions: ``(n, 3)`` centres in pixels, ``(x, y, z)`` relative to index ``L // 2``.
        weights: ``(n,)`` mass of each Gaussian.
        sigma: standard deviation in pixels.
        L: box size.
    Returns:
        ``(L, L, L)`` with ``sum(volume) ~= sum(weights)`` for Gaussians well inside the box
        (each Gaussian is normalised as a continuous density per voxel volume).
    """
    device = positions.device
    out = torch.zeros(L * L * L, device=device, dtype=dtype)
    if positions.shape[0] == 0:
        return out.view(L, L, L)
    pos = positions.to(torch.float64) + L // 2  # fractional array index per (x, y, z)
    w = weights.to(device=device, dtype=torch.float64)
    half = int(math.ceil(_TRUNCATE_SIGMAS * sigma))
    offsets = torch.arange(-half, half + 1, device=device)
    width = offsets.numel()
    norm = 1.0 / (math.sqrt(2.0 * math.pi) * sigma)
    chunk = max(1, _CHUNK_SAMPLES // width**3)
    for start in range(0, pos.shape[0], chunk):
        p = pos[start : start + chunk]
        base = torch.round(p).long()
        idx = base[:, :, None] + offsets  # (n, 3, width)
        profile = norm * torch.exp(-0.5 * ((idx - p[:, :, None]) / sigma) ** 2)
        # Samples outside the box are dropped, not wrapped.
        inside = (idx >= 0) & (idx < L)
        profile = profile * inside
        idx = idx.clamp(0, L - 1)
        gx, gy, gz = profile[:, 0], profile[:, 1], profile[:, 2]
        ix, iy, iz = idx[:, 0], idx[:, 1], idx[:, 2]
        vals = (
            w[start : start + chunk, None, None, None]
            * gz[:, :, None, None]
            * gy[:, None, :, None]
            * gx[:, None, None, :]
        )
        flat = (iz[:, :, None, None] * L + iy[:, None, :, None]) * L + ix[:, None, None, :]
        out.index_add_(0, flat.reshape(-1), vals.reshape(-1).to(dtype))
    return out.view(L, L, L)


def gaussian_density(
    coords_A: torch.Tensor,
    weights: torch.Tensor,
    L: int,
    pixel_size: float,
    resolution_A: float,
    center: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rasterise point masses (e.g. atoms) as Gaussians whose width matches a resolution.

    Each point becomes an isotropic Gaussian of standard deviation
    ``sigma = resolution_A / (pi * sqrt(2))`` Angstrom, evaluated at voxel centres. Values are
    a density per cubic Angstrom: ``volume.sum() * pixel_size**3 ~= weights.sum()`` for points
    well inside the box. Points near the edge lose the part of their Gaussian outside the box
    (no wrap-around).

    Args:
        coords_A: ``(n, 3)`` positions in Angstrom, ``(x, y, z)`` order.
        weights: ``(n,)`` mass per point (e.g. atomic number).
        L: box size in voxels.
        pixel_size: voxel size in Angstrom.
        resolution_A: target resolution in Angstrom.
        center: if True, shift the points so their weighted centre of mass sits at the box
            centre (index ``L // 2``); if False, the coordinate origin sits there.
        dtype: output dtype.
    Returns:
        ``(L, L, L)`` volume indexed ``(z, y, x)``, on the device of ``coords_A``.
    """
    if coords_A.ndim != 2 or coords_A.shape[-1] != 3:
        raise ValueError(f"coords_A must be (n, 3), got {tuple(coords_A.shape)}")
    if weights.shape != coords_A.shape[:1]:
        raise ValueError(f"weights must be ({coords_A.shape[0]},), got {tuple(weights.shape)}")
    if pixel_size <= 0 or resolution_A <= 0:
        raise ValueError(f"pixel_size and resolution_A must be > 0, got {pixel_size}, {resolution_A}")
    coords = coords_A.to(torch.float64)
    w = weights.to(device=coords.device, dtype=torch.float64)
    if center:
        coords = coords - (w[:, None] * coords).sum(0) / w.sum()
    sigma_px = resolution_to_sigma(resolution_A) / pixel_size
    vol = _splat_gaussians(coords / pixel_size, w, sigma_px, L, dtype=torch.float64)
    return (vol / pixel_size**3).to(dtype)


def _random_rotation(generator: torch.Generator) -> np.ndarray:
    """Uniformly random 3x3 rotation matrix (QR of a Gaussian matrix, signs fixed)."""
    a = torch.randn(3, 3, generator=generator, device=generator.device, dtype=torch.float64)
    q, r = np.linalg.qr(a.cpu().numpy())
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _default_bead_sigma(L: int) -> float:
    # Larger boxes resolve finer detail of the same molecule, so beads shrink relative to L
    # (but grow in pixels): 0.86 px at L=16, 1.5 px at L=64, 2 px at L=128.
    return 1.5 * (L / 64.0) ** 0.4


def random_molecule(
    L: int,
    generator: torch.Generator,
    *,
    radius_fraction: float = 0.36,
    bead_sigma: float | None = None,
    fill: float = 0.45,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Procedural protein-like molecule: a confined, self-avoiding-ish chain of Gaussian beads.

    Recipe (all lengths in pixels, so the molecule fills the same fraction of any box):

    1. An envelope ellipsoid with random semi-axes ``a >= b >= c`` (``a`` in
       ``[0.85, 1] * R``, ``b / a`` in ``[0.55, 0.95]``, ``c / b`` in ``[0.5, 0.9]``, so shapes
       range from globular to elongated and are never close to spherical) and a random
       orientation, where ``R = radius_fraction * L - 1.5 * bead_sigma``.
    2. One to three domains: shrunken copies of the envelope at random offsets inside it.
    3. A persistent random walk with step ``1.5 * bead_sigma`` (like a CA-CA trace at coarse
       scale) fills the domains one after the other, joined by short linkers. Each step picks
       the first of 24 random candidate directions (8 persistent, then 16 isotropic) that
       stays in the current domain and does not enter the excluded ball (radius
       ``0.8 * step``) of an earlier bead; if none does, it steps roughly towards the domain
       centre, accepting overlap. The number of beads is ``fill * domain volume / step**3`` (a few hundred
       at L = 64).
    4. Beads (weights uniform in ``[0.7, 1.3]``) are rendered as Gaussians of standard
       deviation ``bead_sigma`` and the volume is scaled to a maximum of 1.

    Every bead centre lies within ``radius_fraction * L`` of the box centre, so (with the
    default 0.36) essentially all the mass is within ``0.45 L`` and every projection fits in
    the inscribed disk. The result is deterministic given the generator's state.

    Args:
        L: box size in voxels.
        generator: source of randomness; its device is used for the draws.
        radius_fraction: radius, as a fraction of ``L``, of the sphere containing bead centres.
        bead_sigma: bead standard deviation in pixels; default ``1.5 * (L / 64) ** 0.4``.
        fill: fraction of the domain volume the chain aims to occupy (controls bead count).
        device: output device (default: the generator's device).
        dtype: output dtype.
    Returns:
        ``(L, L, L)`` non-negative density indexed ``(z, y, x)``, maximum 1.
    """
    sigma = _default_bead_sigma(L) if bead_sigma is None else float(bead_sigma)
    step = 1.5 * sigma
    radius = radius_fraction * L - 1.5 * sigma
    if radius <= 2 * step:
        raise ValueError(f"box L={L} too small for beads of sigma {sigma:.2f} px")
    gdev = generator.device

    def uniform(n: int) -> np.ndarray:
        return torch.rand(n, generator=generator, device=gdev, dtype=torch.float64).cpu().numpy()

    # Envelope.
    u = uniform(4)
    a = radius * (0.85 + 0.15 * u[0])
    b = a * (0.55 + 0.40 * u[1])
    c = b * (0.50 + 0.40 * u[2])
    axes = np.array([a, b, c])
    rot = _random_rotation(generator)
    n_domains = 1 + int(u[3] * 3)

    # Domains share the envelope's orientation; a copy scaled by s and offset by (1 - s) * v
    # (|v| <= 1, in envelope-normalised coordinates) lies inside the envelope.
    scale = [1.0, 0.75, 0.65][n_domains - 1]
    directions = torch.randn(n_domains, 3, generator=generator, device=gdev, dtype=torch.float64)
    directions = directions.cpu().numpy()
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    if n_domains == 1:
        directions[:] = 0.0
    dom_centres = ((1.0 - scale) * directions * axes) @ rot.T  # (k, 3) pixels, (x, y, z)
    dom_axes = scale * axes
    dom_volume = 4.0 / 3.0 * math.pi * float(np.prod(dom_axes))
    per_domain = max(8, int(round(fill * dom_volume / step**3)))

    def inside(points: np.ndarray, centre: np.ndarray, semi: np.ndarray) -> np.ndarray:
        local = (points - centre) @ rot / semi  # envelope-frame coordinates, normalised
        return np.einsum("ij,ij->i", local, local) <= 1.0

    # Excluded-volume grid at 1 px resolution; an earlier bead forbids a ball around it.
    r_excl = 0.8 * step
    rr = int(math.ceil(r_excl))
    g = np.arange(-rr, rr + 1)
    stencil = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    stencil = stencil[np.linalg.norm(stencil, axis=1) <= r_excl]
    occupied = np.zeros((L, L, L), dtype=bool)

    def voxel(points: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(points).astype(np.int64) + L // 2, 0, L - 1)

    # Each step tries persistent directions first (a smooth, chain-like trace), then
    # isotropic ones (to turn away from walls and earlier beads).
    n_persistent, n_isotropic = 8, 16
    max_steps = n_domains * per_domain * 3
    noise = torch.randn(max_steps, n_persistent + n_isotropic, 3, generator=generator,
                        device=gdev, dtype=torch.float64).cpu().numpy()
    persistence = 2.0

    beads: list[np.ndarray] = []
    p = dom_centres[0].copy()
    d = noise[0, 0] / np.linalg.norm(noise[0, 0])
    t = 0
    for k in range(n_domains):
        centre = dom_centres[k]
        placed = 0
        while placed < per_domain and t < max_steps:
            in_domain = inside(p[None], centre, dom_axes)[0]
            if in_domain:
                region_c, region_ax, pull = centre, dom_axes, 0.0
            else:  # linker: stay in the envelope and drift towards the next domain
                region_c, region_ax, pull = np.zeros(3), axes, 1.5
            towards = centre - p
            towards /= max(float(np.linalg.norm(towards)), 1e-9)
            cand_dir = noise[t].copy()
            cand_dir[:n_persistent] += persistence * d + pull * towards
            cand_dir /= np.linalg.norm(cand_dir, axis=1, keepdims=True)
            cand = p + step * cand_dir
            vox = voxel(cand)
            ok = inside(cand, region_c, region_ax) & ~occupied[vox[:, 2], vox[:, 1], vox[:, 0]]
            if ok.any():
                d = cand_dir[int(np.argmax(ok))]
            else:  # trapped: head roughly for the domain centre, accepting overlap
                d = towards + 0.5 * noise[t, 0]
                d /= np.linalg.norm(d)
            t += 1
            p_new = p + step * d
            if beads:
                # Mark the previous bead only now, so the new bead's own ball never blocks
                # the next step.
                prev = voxel(beads[-1][None] + stencil)
                occupied[prev[:, 2], prev[:, 1], prev[:, 0]] = True
            beads.append(p_new)
            p = p_new
            if in_domain:
                placed += 1

    pos = np.stack(beads)
    # Guarantee the containment promised above, whatever the walk did.
    r = np.linalg.norm(pos, axis=1, keepdims=True)
    pos = np.where(r > radius, pos * radius / np.maximum(r, 1e-12), pos)

    out_device = gdev if device is None else torch.device(device)
    positions = torch.from_numpy(pos).to(out_device)
    weights = 0.7 + 0.6 * torch.rand(len(pos), generator=generator, device=gdev,
                                     dtype=torch.float64).to(out_device)
    vol = _splat_gaussians(positions, weights, sigma, L, dtype=torch.float64)
    return (vol / vol.max()).to(dtype)


def center_crop_or_pad(volume: torch.Tensor, L_out: int) -> torch.Tensor:
    """Real-space centred crop or zero pad of the last three axes to ``L_out``.

    Index ``L // 2`` of the input maps to index ``L_out // 2`` of the output.

    Args:
        volume: ``(..., L, L, L)``.
        L_out: new box size.
    Returns:
        ``(..., L_out, L_out, L_out)``.
    """
    L = volume.shape[-1]
    if L_out == L:
        return volume
    if L_out < L:
        s = L // 2 - L_out // 2
        return volume[..., s : s + L_out, s : s + L_out, s : s + L_out]
    out = volume.new_zeros(volume.shape[:-3] + (L_out,) * 3)
    s = L_out // 2 - L // 2
    out[..., s : s + L, s : s + L, s : s + L] = volume
    return out


def _padded_size(L: int, ratio: float, tol: float = 0.01) -> int:
    """Smallest ``L_pad >= L`` with ``L_pad * ratio`` within ``tol`` of an integer.

    Falls back to the best ``L_pad`` in ``[L, 2 L]`` when none is within ``tol``.
    """
    best, best_err = L, math.inf
    for L_pad in range(L, 2 * L + 1):
        err = abs(L_pad * ratio - round(L_pad * ratio))
        if err <= tol:
            return L_pad
        if err < best_err:
            best, best_err = L_pad, err
    return best


def resample_volume(
    volume: torch.Tensor, pixel_size_in: float, pixel_size_out: float, L_out: int
) -> torch.Tensor:
    """Change a volume's voxel size by Fourier crop/pad, then crop/pad the box to ``L_out``.

    The field of view after Fourier resizing must be a whole number of output voxels, so the
    input is first zero padded in real space (centred) to the smallest box ``L_pad`` for which
    ``L_pad * pixel_size_in / pixel_size_out`` is within 0.01 of an integer; the resulting
    voxel size differs from ``pixel_size_out`` by at most about ``0.01 / L_out`` relative.
    Values are preserved (a density stays a density per cubic Angstrom); downsampling
    discards frequencies beyond the new Nyquist. The centre stays at index ``L // 2``.

    Args:
        volume: ``(..., L, L, L)`` real, voxel size ``pixel_size_in`` Angstrom.
        pixel_size_in: input voxel size (Angstrom).
        pixel_size_out: requested voxel size (Angstrom).
        L_out: output box size.
    Returns:
        ``(..., L_out, L_out, L_out)`` with voxel size ``pixel_size_out``.
    """
    if pixel_size_in <= 0 or pixel_size_out <= 0:
        raise ValueError(f"pixel sizes must be > 0, got {pixel_size_in} and {pixel_size_out}")
    ratio = pixel_size_in / pixel_size_out
    L = volume.shape[-1]
    L_pad = _padded_size(L, ratio)
    x = center_crop_or_pad(volume, L_pad)
    L_mid = max(1, int(round(L_pad * ratio)))
    if L_mid != L_pad:
        x = fourier_resize(x, L_mid, ndim=3)
    return center_crop_or_pad(x, L_out)


def soft_sphere_mask(
    L: int,
    radius: float,
    width: float,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Spherical mask around index ``L // 2`` with a raised-cosine edge.

    Args:
        L: box size.
        radius: radius (pixels) where the mask starts to fall off.
        width: width (pixels) of the cosine edge; 0 gives a hard mask.
    Returns:
        ``(L, L, L)``: 1 for ``r <= radius``, ``0.5 * (1 + cos(pi * (r - radius) / width))``
        for ``radius < r < radius + width``, 0 beyond.
    """
    r = radial_grid(L, 3, device=device, dtype=dtype)
    if width <= 0:
        return (r <= radius).to(dtype)
    t = ((r - radius) / width).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))
