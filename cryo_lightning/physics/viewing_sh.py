"""In-plane-uniform viewing distributions in even-degree spherical harmonics, and their sampling.

A density on SO(3) (with respect to the Haar probability measure) that depends on a RELION pose
``A`` only through its viewing direction ``v = A^T e_z`` (in-plane angle uniform)::

    rho(A) = sum_{l even <= degree} sum_{m=-l..l} b_lm sqrt(4 pi / (2l + 1)) Y_lm(v)
           = sum_{l, m} b_lm D_l(A)[0, m]          (row m' = 0 of the real Wigner matrix)
           = sum_{l, m} b_lm D_l(A^T)[m, 0]        (the "D^l_{m0}" form of DESIGN section 4.5)

with the real harmonics ``Y_lm`` and Wigner matrices ``D_l`` of
:mod:`cryo_lightning.physics.spherical_harmonics` (``Y_l(R u) = D_l(R) Y_l(u)``). So
``b_00 = 1`` normalises (``E[1] = 1``), the uniform distribution is ``b = (1, 0, ...)``, the
density of ``v`` on the sphere (per steradian) is ``rho / (4 pi)``, and
``E[Y_lm(v)] = b_lm / sqrt(4 pi (2l + 1))``. In ``sqrt(4 pi / (2l + 1)) Y_l0 = P_l(cos theta)``
form, ``rho = 1 + b_20 P_2(v_z)`` for instance.

Only even degrees, as in DESIGN section 4.5 and the subspace method-of-moments code:
``rho(v) = rho(-v)``. Degree ``2h`` has ``(h + 1)(2h + 1)`` coefficients,
stored as ``l = 0, 2, ..., 2h`` then ``m = -l..l``.

Bounds are certified on the whole sphere, not only at nodes. Take an equiangular grid of cell
centres whose covering distance is ``delta`` (every point is within ``delta`` of a node along a
meridian then a parallel; the geodesic distance is shorter). At the minimiser ``v*`` the
gradient vanishes; on the great circle through ``v*`` and its nearest node, ``rho`` is a
trigonometric polynomial ``f`` of degree ``n = degree`` with ``f'(0) = 0``, and Bernstein's
inequality twice, applied to ``rho - c`` for any constant ``c``, gives ``|f''| <= n^2 max|rho -
c|``; so ``min rho >= grid min - (n delta)^2 / 2 * max|rho - c|`` (likewise for the maximum),
with ``c`` the mid-range; see :meth:`SHViewingDistribution.bounds`.

Conventions pinned by tests/physics/test_viewing_sh.py (docs/conventions.md section 15).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cryo_lightning.physics.rotations import PoseSampler, ViewingDistribution
from cryo_lightning.physics.spherical_harmonics import real_spherical_harmonics, sphere_quadrature

__all__ = ["even_sh_count", "SHViewingDistribution"]

# Bernstein grid: degree * delta <= this, so certified bounds are within 0.5% of the range of grid values.
_BERNSTEIN_FRACTION = 0.1
_GRID_CHUNK = 1 << 15


def even_sh_count(degree: int) -> int:
    """Number of coefficients of even degrees ``0, 2, ..., degree``: ``(h + 1)(2h + 1)``, ``h = degree / 2``."""
    _check_degree(degree)
    h = degree // 2
    return (h + 1) * (2 * h + 1)


def _check_degree(degree: int) -> None:
    if degree < 0 or degree % 2:
        raise ValueError(f"degree must be even and >= 0, got {degree}")


def _even_columns(degree: int) -> torch.Tensor:
    """Positions of the even-degree harmonics in the full layout of degree ``degree``."""
    return torch.tensor([l * l + l + m for l in range(0, degree + 1, 2) for m in range(-l, l + 1)])


def _even_scale(degree: int) -> torch.Tensor:
    """``sqrt(4 pi / (2l + 1))`` per coefficient."""
    return torch.tensor(
        [math.sqrt(4 * math.pi / (2 * l + 1)) for l in range(0, degree + 1, 2) for _ in range(2 * l + 1)],
        dtype=torch.float64,
    )


def _bernstein_grid(degree: int) -> tuple[torch.Tensor, float]:
    """Equiangular cell-centre grid ``(Q, 3)`` and its ``degree * delta``."""
    n_theta = max(1, math.ceil(math.pi * degree / _BERNSTEIN_FRACTION))
    n_phi = 2 * n_theta
    theta = (torch.arange(n_theta, dtype=torch.float64) + 0.5) * (math.pi / n_theta)
    phi = torch.arange(n_phi, dtype=torch.float64) * (2 * math.pi / n_phi)
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    nodes = torch.stack([t.sin() * p.cos(), t.sin() * p.sin(), t.cos()], dim=-1).reshape(-1, 3)
    delta = math.pi / (2 * n_theta) + math.pi / n_phi
    return nodes, degree * delta


@dataclass(frozen=True)
class SHViewingDistribution(PoseSampler):
    """In-plane-uniform pose distribution with even-degree harmonic coefficients (module docstring).

    Attributes:
        coeffs: ``(even_sh_count(degree),)`` float64, ``b_lm`` for ``l = 0, 2, ..., degree``.
        degree: highest (even) degree ``2h``.
    """

    coeffs: torch.Tensor
    degree: int

    def __post_init__(self) -> None:
        _check_degree(self.degree)
        c = torch.as_tensor(self.coeffs, dtype=torch.float64)
        if c.shape != (even_sh_count(self.degree),):
            n = even_sh_count(self.degree)
            raise ValueError(f"need {n} coefficients for degree {self.degree}, got shape {tuple(c.shape)}")
        object.__setattr__(self, "coeffs", c)

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def uniform(cls, degree: int = 0) -> SHViewingDistribution:
        """Uniform viewing directions (Haar-distributed poses)."""
        c = torch.zeros(even_sh_count(degree), dtype=torch.float64)
        c[0] = 1.0
        return cls(c, degree)

    @classmethod
    def from_function(
        cls,
        fn: Callable[[torch.Tensor], torch.Tensor],
        degree: int,
        quadrature_degree: int | None = None,
        normalize: bool = True,
    ) -> SHViewingDistribution:
        """Orthogonal projection of a function of the viewing direction onto even degrees.

        Exact when ``fn`` is a polynomial of degree ``<= quadrature_degree - degree`` (default
        quadrature degree ``2 * degree + 16``). Projection symmetrises: the result is the
        projection of ``(fn(v) + fn(-v)) / 2``. The result need not be non-negative; see
        :meth:`nonnegative`.

        Args:
            fn: maps unit vectors ``(Q, 3)`` float64 to values ``(Q,)`` (any positive multiple of a
                density: it is rescaled to ``b_00 = 1`` when ``normalize``).
            degree: even target degree.
            quadrature_degree: exactness degree of the sphere quadrature used.
            normalize: divide by ``b_00``.
        """
        _check_degree(degree)
        q = 2 * degree + 16 if quadrature_degree is None else quadrature_degree
        nodes, weights = sphere_quadrature(q)
        values = fn(nodes).to(torch.float64)
        y = real_spherical_harmonics(degree, nodes)[:, _even_columns(degree)]
        # f = sum b_lm s_l Y_lm with s_l = sqrt(4 pi / (2l + 1)) and orthonormal Y: b = <f, Y> / s.
        b = (weights * values) @ y / _even_scale(degree)
        if normalize:
            if b[0] <= 0:
                raise ValueError("the function has a non-positive mean; cannot normalise to b_00 = 1")
            b = b / b[0]
        return cls(b, degree)

    @classmethod
    def from_vmf(cls, distribution: ViewingDistribution, degree: int) -> SHViewingDistribution:
        """Even-degree projection of a von Mises-Fisher mixture (symmetrised over ``v -> -v``).

        Concentrated components have negative lobes after truncation; apply :meth:`nonnegative`.
        """
        w = torch.as_tensor(distribution.weights, dtype=torch.float64)
        w = w / w.sum()
        mu = torch.as_tensor(distribution.means, dtype=torch.float64)
        mu = mu / mu.norm(dim=-1, keepdim=True)
        kappa = torch.as_tensor(distribution.kappas, dtype=torch.float64)

        def density(v: torch.Tensor) -> torch.Tensor:
            # vMF density relative to the uniform measure: kappa / sinh(kappa) exp(kappa cos),
            # written with exp(kappa (cos - 1)) to avoid overflow; 1 at kappa = 0.
            k = kappa.clamp_min(1e-12)
            norm = 2 * k / (-torch.expm1(-2 * k))
            return (w * norm * torch.exp(k * (v @ mu.T - 1.0))).sum(-1)

        return cls.from_function(density, degree, quadrature_degree=2 * degree + 64)

    @classmethod
    def random(
        cls,
        degree: int,
        generator: torch.Generator | None = None,
        uniform_weight: float = 0.0,
    ) -> SHViewingDistribution:
        """A random distribution of degree at most ``degree``, non-negative everywhere.

        ``rho ~ (g(v)^2 + g(-v)^2) / 2`` with ``g`` a random harmonic expansion of degree
        ``degree / 2`` (standard normal coefficients scaled by ``1 / (l + 1)``): non-negative
        everywhere by construction, even, of degree ``<= degree``; its coefficients are computed by
        exact quadrature. Then mixed with the uniform distribution: ``(1 - w) rho + w``.

        Args:
            degree: even degree ``2h``.
            generator: RNG (CPU).
            uniform_weight: ``w`` in ``[0, 1]``; larger is flatter.
        """
        _check_degree(degree)
        h = degree // 2
        scale = torch.tensor([1.0 / (l + 1) for l in range(h + 1) for _ in range(2 * l + 1)], dtype=torch.float64)
        g = torch.randn((h + 1) ** 2, generator=generator, dtype=torch.float64) * scale

        def square(v: torch.Tensor) -> torch.Tensor:
            return 0.5 * ((real_spherical_harmonics(h, v) @ g) ** 2 + (real_spherical_harmonics(h, -v) @ g) ** 2)

        b = cls.from_function(square, degree, quadrature_degree=2 * degree).coeffs
        b = (1.0 - uniform_weight) * b
        b[0] = 1.0
        return cls(b, degree)

    # ----------------------------------------------------------------------------- evaluation
    def density(self, directions: torch.Tensor) -> torch.Tensor:
        """``rho`` at viewing directions.

        Args:
            directions: ``(..., 3)`` vectors ``(x, y, z)`` (normalised here).
        Returns:
            ``(...)`` float64, relative to the uniform measure (mean 1).
        """
        y = real_spherical_harmonics(self.degree, directions.to(torch.float64))
        y = y[..., _even_columns(self.degree).to(y.device)]
        return y @ (self.coeffs * _even_scale(self.degree)).to(y.device)

    def density_of_poses(self, rotations: torch.Tensor) -> torch.Tensor:
        """``rho(A)`` for RELION pose matrices ``(..., 3, 3) -> (...)`` float64."""
        return self.density(rotations[..., 2, :])

    def bounds(self) -> tuple[float, float]:
        """Certified lower and upper bounds of ``rho`` over the whole sphere.

        With ``n = degree`` and ``delta`` the grid's covering distance (``n delta <= 0.1``), the
        extrema are within ``e M`` of the grid's, ``e = (n delta)^2 / 2`` and ``M = max|rho - c|
        <= (grid max - grid min) / 2 / (1 - e)`` for the grid's mid-range ``c`` (module
        docstring). Exact for the uniform distribution.
        """
        lo, hi, e = self._grid_stats()
        margin = e * 0.5 * (hi - lo) / (1.0 - e)
        return lo - margin, hi + margin

    def _grid_stats(self) -> tuple[float, float, float]:
        """Minimum and maximum of ``rho`` on the Bernstein grid, and ``e = (degree * delta)^2 / 2``."""
        nodes, nd = _bernstein_grid(self.degree)
        lo, hi = math.inf, -math.inf
        for chunk in torch.split(nodes, _GRID_CHUNK):
            r = self.density(chunk)
            lo, hi = min(lo, float(r.min())), max(hi, float(r.max()))
        return lo, hi, 0.5 * nd * nd

    def nonnegative(self, iterations: int = 50) -> SHViewingDistribution:
        """A nearby distribution that is certified non-negative everywhere (``bounds()[0] >= 0``).

        Alternating projections between the even-degree space and the non-negative functions at the
        nodes of an exact quadrature (clip, re-project), then a mixture with the uniform
        distribution, ``(rho + t) / (1 + t)``, with the smallest ``t`` making the certified lower
        bound non-negative. Returns ``self`` when already certified.
        """
        if self.bounds()[0] >= 0:
            return self
        nodes, weights = sphere_quadrature(2 * self.degree + 16)
        y = real_spherical_harmonics(self.degree, nodes)[:, _even_columns(self.degree)]
        s = _even_scale(self.degree)
        b = self.coeffs.clone()
        for _ in range(iterations):
            values = (y @ (b * s)).clamp_min(0.0)
            b = (weights * values) @ y / s
            b = b / b[0]
        g_min, g_max, e = SHViewingDistribution(b, self.degree)._grid_stats()
        # Smallest t with a non-negative certified bound for (rho + t) / (1 + t), whose grid values
        # are (g + t) / (1 + t): g_min + t - e / (1 - e) * (g_max - g_min) / 2 >= 0.
        t = max(0.0, e / (1.0 - e) * 0.5 * (g_max - g_min) - g_min)
        t = t * (1.0 + 1e-9) + 1e-12  # rounding
        b = b / (1.0 + t)
        b[0] = 1.0
        return SHViewingDistribution(b, self.degree)

    # ----------------------------------------------------------------------------- sampling
    def sample_directions(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``n`` viewing directions ``(n, 3)`` drawn from ``rho`` by rejection sampling.

        Proposals are uniform on the sphere and accepted with probability ``rho(v) / M``, ``M``
        the certified upper bound of :meth:`bounds`, so samples follow ``max(rho, 0)`` exactly
        (negative values, if any, are treated as 0; use :meth:`nonnegative` first). The expected
        number of proposals is ``M`` per sample.
        """
        upper = self.bounds()[1]
        if upper <= 0:
            raise ValueError("the density is nowhere positive")
        out, have = [], 0
        while have < n:
            m = int(1.2 * (n - have) * upper) + 16
            v = torch.randn(m, 3, generator=generator, device=device, dtype=torch.float64)
            v = v / v.norm(dim=-1, keepdim=True)
            u = torch.rand(m, generator=generator, device=device, dtype=torch.float64)
            keep = v[u * upper < self.density(v)]
            out.append(keep[: n - have])
            have += out[-1].shape[0]
        return torch.cat(out).to(dtype)

