"""Procedural macromolecules that look like the structures people image, in physical units.

The bead chains of :func:`cryo_lightning.physics.volumes.random_molecule` are sparse and
uniform; real single-particle specimens are dense, have a protein-like packing of secondary
structure (rods of about 10 Angstrom seen at 5-10 Angstrom resolution), domains, cavities,
symmetric assemblies, and (ribosomes) high-density RNA cores. :func:`random_structure` draws
one of several families and renders it at a given pixel size:

- ``globular``: one near-spherical envelope;
- ``elongated``: a bent chain of two to four overlapping ellipsoids (aspect ratio 2-5);
- ``flat``: an oblate disc (thickness 0.2-0.45 of its diameter);
- ``hollow``: a shell (inner radius 0.45-0.8 of the outer) or a barrel with a channel;
- ``multidomain``: two to five domains of different sizes packed together;
- ``symmetric``: an asymmetric subunit repeated by a point group (Cn, Dn with n <= 8, and
  occasionally T, O, I, which make closed shells);
- ``complex``: a ribosome-like pair of subunits around a dense RNA-like core (density 1.5-2x
  protein), with solvent channels cut through it;
- ``chain``: the project's sparse bead chain (``random_molecule``), kept for sparse molecules.

Density model: secondary-structure elements (straight rods of radius 4-6 Angstrom and length
10-40 Angstrom, packed at 45-70% of the envelope volume) plus a uniform filler (loops and side
chains), all inside the envelope (solvent flattened: zero outside), rendered as Gaussians whose
width combines the element radius and a random map resolution of 2-4 pixels. When the molecule
has more elements than a budget allows (large particles at fine pixel sizes) the elements are
coarsened together, which only removes detail below the rendered resolution.

Conventions (docs/conventions.md): volumes ``(L, L, L)`` float32 indexed ``(z, y, x)``, centre
``L // 2``; point coordinates ``(x, y, z)`` in Angstrom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cryo_lightning.physics.point_groups import point_group
from cryo_lightning.physics.volumes import _default_bead_sigma, gaussian_density, random_molecule, resolution_to_sigma

__all__ = ["STRUCTURE_FAMILIES", "Envelope", "random_structure"]

STRUCTURE_FAMILIES = ("globular", "elongated", "flat", "hollow", "multidomain", "symmetric", "complex", "chain")
# Draw probabilities of the families (dense, real-looking families first).
_FAMILY_WEIGHTS = np.array([0.12, 0.12, 0.08, 0.10, 0.16, 0.20, 0.14, 0.08])
# Most secondary-structure elements a molecule gets before they are coarsened together.
_MAX_ELEMENTS = 3000
# Most filler points (density between elements), a cap on render cost.
_MAX_FILLER = 6000


@dataclass
class Envelope:
    """A union of ellipsoids minus a union of ellipsoidal holes, in Angstrom.

    Attributes:
        centres: ``(k, 3)`` ellipsoid centres ``(x, y, z)``.
        axes: ``(k, 3)`` semi-axes.
        rotations: ``(k, 3, 3)`` body-to-lab rotations (columns are the body axes).
        holes: ``(h, 3)``, ``(h, 3)``, ``(h, 3, 3)`` centres, semi-axes and rotations of solvent
            cavities and channels carved out of the union (may be empty).
        density: ``(k,)`` relative density of each ellipsoid (1 = protein); a point inside several
            takes the largest.
    """

    centres: np.ndarray
    axes: np.ndarray
    rotations: np.ndarray
    density: np.ndarray
    holes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @staticmethod
    def _inside(points: np.ndarray, centres: np.ndarray, axes: np.ndarray, rotations: np.ndarray) -> np.ndarray:
        """``(n, k)`` True where point ``i`` lies in ellipsoid ``j``."""
        local = np.einsum("nkd,kde->nke", points[:, None, :] - centres[None], rotations) / axes[None]
        return (local * local).sum(-1) <= 1.0

    def density_at(self, points: np.ndarray) -> np.ndarray:
        """``(n,)`` relative density at ``(n, 3)`` points: 0 outside the envelope."""
        inside = self._inside(points, self.centres, self.axes, self.rotations)
        value = np.where(inside, self.density[None], 0.0).max(1)
        if self.holes is not None and len(self.holes[0]):
            value = np.where(self._inside(points, *self.holes).any(1), 0.0, value)
        return value

    def bounding_radius(self) -> float:
        """Radius (Angstrom, about the origin) of a sphere containing every ellipsoid."""
        return float((np.linalg.norm(self.centres, axis=1) + self.axes.max(1)).max())

    def volume(self, rng: np.random.Generator, samples: int = 20000) -> float:
        """Monte Carlo volume of the envelope (cubic Angstrom)."""
        r = self.bounding_radius()
        pts = rng.uniform(-r, r, size=(samples, 3))
        return float((self.density_at(pts) > 0).mean()) * (2 * r) ** 3

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``(m, 3)`` points uniform in the envelope (rejection sampling, ``m <= n``, usually ``= n``)."""
        r = self.bounding_radius()
        out: list[np.ndarray] = []
        have = 0
        for _ in range(50):
            pts = rng.uniform(-r, r, size=(max(4 * n, 1000), 3))
            keep = pts[self.density_at(pts) > 0]
            out.append(keep)
            have += len(keep)
            if have >= n:
                break
        pts = np.concatenate(out)[:n] if out else np.zeros((0, 3))
        return pts


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _ellipsoid(centre, axes, rotation, density: float = 1.0):
    centre = np.broadcast_to(np.asarray(centre, float), (3,)).copy()
    return centre, np.asarray(axes, float), np.asarray(rotation, float), float(density)


def _envelope(parts: list, holes: list | None = None) -> Envelope:
    c, a, r, d = (np.stack([p[i] for p in parts]) for i in range(4))
    h = None
    if holes:
        h = tuple(np.stack([p[i] for p in holes]) for i in range(3))
    return Envelope(c, a, r, d.astype(np.float64), h)


def _family_envelope(family: str, R: float, rng: np.random.Generator) -> tuple[Envelope, dict]:
    """An envelope of about radius ``R`` Angstrom for ``family``, and what was drawn."""
    info: dict = {"family": family}
    if family == "globular":
        a = R * rng.uniform(0.9, 1.0)
        axes = [a, a * rng.uniform(0.78, 1.0), a * rng.uniform(0.7, 0.95)]
        return _envelope([_ellipsoid(0, axes, _random_rotation(rng))]), info
    if family == "flat":
        a = R * rng.uniform(0.9, 1.0)
        axes = [a, a * rng.uniform(0.8, 1.0), a * rng.uniform(0.2, 0.45)]
        return _envelope([_ellipsoid(0, axes, _random_rotation(rng))]), info
    if family == "elongated":
        k = int(rng.integers(2, 5))
        # A bent path of k segments spanning about 2R.
        direction = _unit(rng)[0]
        width = 2 * R / rng.uniform(2.0, 5.0) / 2
        seg = (2 * R - 2 * width) / max(k - 1, 1)
        pts = [np.zeros(3)]
        for _ in range(k - 1):
            direction = direction + 0.5 * _unit(rng)[0]
            direction /= np.linalg.norm(direction)
            pts.append(pts[-1] + seg * direction)
        pts = np.stack(pts)
        pts -= pts.mean(0)
        parts = []
        for i in range(k):
            tangent = (pts[min(i + 1, k - 1)] - pts[max(i - 1, 0)])
            tangent /= max(np.linalg.norm(tangent), 1e-9)
            rot = _random_rotation(rng)
            rot[:, 0] = tangent
            rot, _ = np.linalg.qr(rot)
            if np.linalg.det(rot) < 0:
                rot[:, 2] = -rot[:, 2]
            w = width * rng.uniform(0.8, 1.2)
            parts.append(_ellipsoid(pts[i], [0.75 * seg + w, w, w * rng.uniform(0.7, 1.0)], rot))
        info["segments"] = k
        return _envelope(parts), info
    if family == "hollow":
        rot = _random_rotation(rng)
        if rng.random() < 0.6:  # shell (apoferritin- or capsid-like)
            inner = rng.uniform(0.45, 0.8)
            axes = np.array([R, R * rng.uniform(0.85, 1.0), R * rng.uniform(0.8, 1.0)])
            info["shape"] = "shell"
            hole = _ellipsoid(0, axes * inner, rot)[:3]
            return _envelope([_ellipsoid(0, axes, rot)], [hole]), info
        # barrel with a central channel (chaperonin- or pore-like)
        length, radius = R * rng.uniform(0.9, 1.0), R * rng.uniform(0.55, 0.85)
        info["shape"] = "barrel"
        hole = _ellipsoid(0, [radius * rng.uniform(0.3, 0.6)] * 2 + [length * 1.2], rot)[:3]
        return _envelope([_ellipsoid(0, [radius, radius, length], rot)], [hole]), info
    if family in ("multidomain", "complex"):
        if family == "multidomain":
            k = int(rng.integers(2, 6))
            sizes = rng.uniform(0.35, 0.65, size=k) * R
            dens = rng.uniform(0.85, 1.15, size=k)
        else:  # two subunits, the large one with a dense RNA-like core
            sizes = np.array([rng.uniform(0.72, 0.85), rng.uniform(0.5, 0.65)]) * R
            dens = np.array([1.0, 1.0])
            k = 2
        centres = [np.zeros(3)]
        for i in range(1, k):  # each new domain touches a random earlier one
            j = int(rng.integers(0, i))
            d = _unit(rng)[0]
            centres.append(centres[j] + d * (sizes[i] + sizes[j]) * rng.uniform(0.55, 0.8))
        centres = np.stack(centres)
        centres -= (centres * sizes[:, None] ** 3).sum(0) / (sizes**3).sum()
        parts = [_ellipsoid(centres[i], sizes[i] * np.array([1.0, rng.uniform(0.75, 1.0), rng.uniform(0.65, 0.95)]),
                            _random_rotation(rng), dens[i]) for i in range(k)]
        holes = []
        if family == "complex":
            core = rng.uniform(1.5, 2.0)
            parts.append(_ellipsoid(centres[0], parts[0][1] * rng.uniform(0.55, 0.75), parts[0][2], core))
            parts.append(_ellipsoid(centres[1], parts[1][1] * rng.uniform(0.4, 0.6), parts[1][2], core * 0.9))
            for _ in range(int(rng.integers(2, 5))):  # solvent channels and the inter-subunit gap
                t = _random_rotation(rng)
                holes.append(_ellipsoid(centres[0] * rng.uniform(0, 1), [0.08 * R, 0.08 * R, 0.6 * R], t)[:3])
            info["core_density"] = round(float(core), 2)
        info["domains"] = k
        return _envelope(parts, holes), info
    raise ValueError(f"unknown structure family {family!r}")


def _symmetric_envelope(R: float, rng: np.random.Generator) -> tuple[Envelope, np.ndarray, dict]:
    """The asymmetric subunit of a point-group assembly within radius ``R``, and the group's
    ``(n, 3, 3)`` rotations (the assembly is the union of the subunit's images)."""
    u = rng.random()
    if u < 0.42:
        group = f"C{int(rng.integers(2, 9))}"
    elif u < 0.84:
        group = f"D{int(rng.integers(2, 8))}"
    else:
        group = str(rng.choice(["T", "O", "I"]))
    ops = point_group(group)
    n = len(ops)
    # Subunits on a ring (Cn, Dn) or a sphere (T, O, I) of radius rho, each of size s: the
    # assembly radius is rho + s, and s shrinks with the number of copies so they pack.
    if group[0] in "CD":
        rho = R * rng.uniform(0.3, 0.6)
        s = min(R - rho, max(0.25 * R, 1.1 * math.pi * rho / n))
        zoff = rng.uniform(0.15, 0.5) * s if group[0] == "D" else rng.uniform(-0.3, 0.3) * s
        base = np.array([rho, 0.0, zoff])
    else:
        rho = R * rng.uniform(0.55, 0.75)
        s = min(R - rho, max(0.18 * R, 2.2 * rho / math.sqrt(n)))
        base = rho * _unit(rng)[0]
    sub_rot = _random_rotation(rng)
    parts = [_ellipsoid(base, s * np.array([1.0, rng.uniform(0.6, 0.9), rng.uniform(0.45, 0.8)]), sub_rot)]
    if rng.random() < 0.5:  # a second domain
        off = _unit(rng)[0] * s * 0.6
        parts = [_ellipsoid(base - 0.4 * off, parts[0][1] * 0.75, sub_rot),
                 _ellipsoid(base + 0.6 * off, s * np.array([0.6, 0.5, 0.4]), _random_rotation(rng))]
    sub = _envelope(parts)
    # Scale the assembly into radius R (the subunit's farthest point is the assembly's).
    scale = R / sub.bounding_radius()
    sub.centres, sub.axes = sub.centres * scale, sub.axes * scale
    return sub, ops, {"family": "symmetric", "group": group, "copies": n}


def _rods(env: Envelope, rng: np.random.Generator, pixel_size: float,
          share: float = 1.0) -> tuple[np.ndarray, np.ndarray, float]:
    """Secondary-structure rods and filler inside ``env``: points ``(n, 3)`` A, weights, and the
    element radius (Angstrom) they are rendered with. ``share``: the fraction of the element and
    filler budgets this envelope gets (a subunit repeated ``1 / share`` times)."""
    vol = env.volume(rng)
    packing = rng.uniform(0.45, 0.7)
    radius = rng.uniform(4.0, 6.0)
    length = rng.uniform(10.0, 40.0, size=1).item()
    n_el = packing * vol / (math.pi * radius**2 * length)
    budget = max(4.0, _MAX_ELEMENTS * share)
    if n_el > budget:  # coarsen: fewer, fatter, longer elements, same packed volume
        f = (n_el / budget) ** (1 / 3)
        radius, length, n_el = radius * f, length * f, budget
    n_el = max(int(round(n_el)), 4)
    centres = env.sample(n_el, rng)
    n_el = len(centres)
    lengths = rng.uniform(0.5, 1.5, size=n_el) * length
    directions = _unit(rng, n_el)
    if rng.random() < 0.5:  # locally aligned packing (bundles) instead of isotropic
        bundle = _unit(rng)[0]
        directions = directions + rng.uniform(1.0, 3.0) * bundle
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    # Points along each rod about one element radius apart.
    step = max(radius, 0.5 * pixel_size)
    per = np.maximum(1, np.round(lengths / step)).astype(int)
    idx = np.repeat(np.arange(n_el), per)
    offs = np.concatenate([(np.arange(p) - (p - 1) / 2) * step for p in per])
    pts = centres[idx] + offs[:, None] * directions[idx]
    w_rod = np.full(len(pts), 1.0)
    # Filler: a fraction of the mass spread uniformly (loops, side chains, disorder).
    filler_fraction = rng.uniform(0.2, 0.45)
    n_fill = min(int(_MAX_FILLER * share) + 1, max(50, len(pts)))
    fill = env.sample(n_fill, rng)
    w_fill = np.full(len(fill), filler_fraction / (1 - filler_fraction) * len(pts) / max(len(fill), 1))
    pts = np.concatenate([pts, fill])
    weights = np.concatenate([w_rod, w_fill]) * rng.uniform(0.8, 1.2, size=len(pts))
    dens = env.density_at(pts)  # solvent flattening and dense cores
    keep = dens > 0
    return pts[keep], (weights * dens)[keep], radius


def random_structure(
    L: int,
    pixel_size: float,
    generator: torch.Generator,
    *,
    diameter: tuple[float, float] = (0.3, 0.95),
    family: str | None = None,
    resolution_px: tuple[float, float] = (2.0, 4.0),
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, dict]:
    """A random, realistic-looking macromolecule rendered in an ``L`` box at ``pixel_size``.

    Args:
        L: box size in voxels.
        pixel_size: Angstrom per voxel (sets the physical size of the molecule and of its
            secondary structure relative to the pixels).
        generator: source of randomness (CPU); the result is deterministic given its state.
        diameter: range of the molecule's largest diameter as a fraction of ``L``.
        family: one of :data:`STRUCTURE_FAMILIES`, or None to draw one.
        resolution_px: range of the rendered map resolution, in pixels (2 = Nyquist).
    Returns:
        ``(L, L, L)`` non-negative density (maximum 1, zero outside the molecule up to the
        Gaussian tails) indexed ``(z, y, x)``, centred on its centre of mass; and a dict
        describing what was drawn (family, diameter in Angstrom, group, ...).
    """
    if pixel_size <= 0:
        raise ValueError(f"pixel_size must be > 0, got {pixel_size}")
    lo, hi = diameter
    if not 0 < lo <= hi < 1:
        raise ValueError(f"diameter fractions must satisfy 0 < low <= high < 1, got {diameter}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    if family is None:
        family = str(rng.choice(STRUCTURE_FAMILIES, p=_FAMILY_WEIGHTS / _FAMILY_WEIGHTS.sum()))
    if family not in STRUCTURE_FAMILIES:
        raise ValueError(f"family must be one of {STRUCTURE_FAMILIES}, got {family!r}")
    fraction = rng.uniform(lo, hi)
    info = {"family": family, "diameter_A": round(float(fraction * L * pixel_size), 1)}
    if family == "chain":
        g = torch.Generator().manual_seed(seed)
        # random_molecule's bead centres lie within radius_fraction * L; beads add ~1.5 sigma. It
        # needs room for a few bead steps (radius > 4.5 sigma): small boxes get at least that.
        smallest = 4.6 * _default_bead_sigma(L) / L
        vol = random_molecule(L, g, radius_fraction=max(0.5 * fraction, 0.12, smallest), dtype=dtype)
        return vol, info
    R = 0.5 * fraction * L * pixel_size
    # Envelope radius leaves room for the rendered blur so the molecule spans `fraction`.
    res_A = rng.uniform(*resolution_px) * pixel_size
    if family == "symmetric":
        # The content (not only the envelope) is symmetric: rods of one subunit, repeated.
        sub, ops, extra = _symmetric_envelope(R * 0.95, rng)
        pts, weights, radius = _rods(sub, rng, pixel_size, share=1.0 / len(ops))
        pts = np.einsum("gij,nj->gni", ops, pts).reshape(-1, 3)
        weights = np.tile(weights, len(ops))
    else:
        env, extra = _family_envelope(family, R * 0.95, rng)
        pts, weights, radius = _rods(env, rng, pixel_size)
    info.update(extra)
    # Gaussian width: the rod's own cross-section combined with the map's resolution.
    sigma = math.hypot(radius / 1.5, resolution_to_sigma(res_A))
    info["resolution_A"] = round(float(res_A), 1)
    vol = gaussian_density(torch.from_numpy(pts), torch.from_numpy(weights), L, pixel_size,
                           resolution_A=sigma * math.pi * math.sqrt(2.0), center=True, dtype=torch.float64)
    vol = vol.clamp_min(0)
    return (vol / vol.max().clamp_min(1e-30)).to(dtype), info
