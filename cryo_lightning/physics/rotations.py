"""Rotations: RELION Euler angles, Haar and von Mises-Fisher sampling, distances, registration.

Conventions (docs/conventions.md):
- RELION Euler angles ``(rot, tilt, psi)`` in degrees, ZYZ. The pose matrix is
  ``A = Rz(-psi) Ry(-tilt) Rz(-rot)``, i.e. scipy's
  ``Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).inv().as_matrix()``.
- Image ``i`` is ``P(x, y) = sum_z V(A_i^T (x, y, z))`` with vectors in ``(x, y, z)`` order, so
  the viewing (projection) direction in the volume frame is
  ``A^T e_z = (sin(tilt) cos(rot), sin(tilt) sin(rot), cos(tilt))``.
- Quaternions are ``(w, x, y, z)``, scalar first, and give active rotation matrices.

All functions are batched over leading axes and follow the dtype/device of their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "euler_to_matrix",
    "matrix_to_euler",
    "quaternion_to_matrix",
    "random_rotations",
    "viewing_direction",
    "directions_to_rotations",
    "PoseSampler",
    "sample_vmf",
    "ViewingDistribution",
    "geodesic_distance",
    "RegistrationResult",
    "register_rotations",
    "rotvec_to_matrix",
]

# z-mirror relating the two hands of an ab initio reconstruction (see ``register_rotations``).
_J_DIAG = (1.0, 1.0, -1.0)


def euler_to_matrix(angles: torch.Tensor) -> torch.Tensor:
    """RELION Euler angles to pose matrices.

    Args:
        angles: ``(..., 3)`` float, ``(rot, tilt, psi)`` in degrees.

    Returns:
        ``(..., 3, 3)`` matrices ``A = Rz(-psi) Ry(-tilt) Rz(-rot)`` (RELION ``Euler_angles2matrix``).
    """
    a, b, g = torch.deg2rad(angles).unbind(-1)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    rows = (
        (cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb),
        (-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb),
        (sb * ca, sb * sa, cb),
    )
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def _wrap_degrees(x: torch.Tensor) -> torch.Tensor:
    """Map degrees from atan2's ``[-180, 180]`` to RELION's ``(-180, 180]``."""
    return torch.where(x <= -180.0, x + 360.0, x)


def matrix_to_euler(matrix: torch.Tensor) -> torch.Tensor:
    """Pose matrices to RELION Euler angles.

    Inverse of :func:`euler_to_matrix`. At gimbal lock (``tilt`` = 0 or 180, detected as
    ``sin(tilt) < 16 eps``) only ``rot + psi`` (tilt 0) or ``psi - rot`` (tilt 180) is defined;
    like RELION's ``Euler_matrix2angles`` we then return ``rot = 0`` and put the whole in-plane
    angle in ``psi``.

    Args:
        matrix: ``(..., 3, 3)`` rotation matrices.

    Returns:
        ``(..., 3)`` degrees: ``rot, psi`` in ``(-180, 180]``, ``tilt`` in ``[0, 180]``.
    """
    sin_tilt = torch.hypot(matrix[..., 2, 0], matrix[..., 2, 1])
    locked = sin_tilt < 16 * torch.finfo(matrix.dtype).eps
    rot = torch.where(locked, 0.0, torch.atan2(matrix[..., 2, 1], matrix[..., 2, 0]))
    # Remove rot first, M = A Rz(rot) = Rz(-psi) Ry(-tilt), whose middle column is (sin psi,
    # cos psi, 0): psi is then well conditioned even when rot is noisy near the poles, and any
    # error in rot is absorbed so that the angles reproduce A.
    c, s = rot.cos(), rot.sin()
    m01 = -matrix[..., 0, 0] * s + matrix[..., 0, 1] * c
    m11 = -matrix[..., 1, 0] * s + matrix[..., 1, 1] * c
    psi = torch.atan2(m01, m11)
    tilt = torch.atan2(sin_tilt, matrix[..., 2, 2])
    out = torch.stack([rot, tilt, psi], dim=-1).rad2deg()
    return torch.stack([_wrap_degrees(out[..., 0]), out[..., 1], _wrap_degrees(out[..., 2])], -1)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(..., 4)`` ``(w, x, y, z)`` to active rotation matrices ``(..., 3, 3)``.

    The input is normalised first, so any non-zero quaternion is accepted.
    """
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    rows = (
        (1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)),
        (2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)),
        (2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)),
    )
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def random_rotations(
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``n`` rotations drawn uniformly (Haar measure on SO(3)), ``(n, 3, 3)``.

    An isotropic Gaussian in R^4, normalised, is uniform on S^3, and S^3 -> SO(3) maps the
    uniform measure to the Haar measure.
    """
    q = torch.randn(n, 4, generator=generator, device=device, dtype=dtype)
    return quaternion_to_matrix(q)


def viewing_direction(matrix: torch.Tensor) -> torch.Tensor:
    """Viewing (projection) direction ``A^T e_z`` in the volume frame: ``(..., 3, 3) -> (..., 3)``."""
    return matrix[..., 2, :]


def directions_to_rotations(
    directions: torch.Tensor, psi: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pose matrices with given viewing directions.

    Args:
        directions: ``(..., 3)`` vectors ``(x, y, z)``, normalised here.
        psi: ``(...)`` in-plane angles in degrees; uniform on ``[0, 360)`` when ``None``.
        generator: RNG for ``psi``.

    Returns:
        ``(..., 3, 3)`` matrices ``A`` with ``A^T e_z`` = the normalised direction.
    """
    d = directions / directions.norm(dim=-1, keepdim=True)
    rot = torch.atan2(d[..., 1], d[..., 0]).rad2deg()
    tilt = torch.atan2(torch.hypot(d[..., 0], d[..., 1]), d[..., 2]).rad2deg()
    if psi is None:
        psi = 360.0 * torch.rand(d.shape[:-1], generator=generator, device=d.device, dtype=d.dtype)
    return euler_to_matrix(torch.stack([rot, tilt, psi.to(d)], dim=-1))


def sample_vmf(
    mean: torch.Tensor, kappa: torch.Tensor | float, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Exact samples from von Mises-Fisher distributions on S^2.

    Uses the inverse CDF of ``w = <x, mean>``, whose density is proportional to ``exp(kappa w)``
    on ``[-1, 1]``: ``w = 1 + log(u + (1 - u) exp(-2 kappa)) / kappa``, with the limit
    ``w = 2u - 1`` (uniform sphere) at ``kappa = 0``.

    Args:
        mean: ``(3,)`` or ``(n, 3)`` mean directions (normalised here); sets dtype and device.
        kappa: concentration ``>= 0``, scalar or ``(n,)``.
        n: number of samples.
        generator: RNG.

    Returns:
        ``(n, 3)`` unit vectors.
    """
    mu = (mean / mean.norm(dim=-1, keepdim=True)).expand(n, 3)
    kappa = torch.as_tensor(kappa, dtype=mu.dtype, device=mu.device).expand(n)
    u, phi = torch.rand(2, n, generator=generator, device=mu.device, dtype=mu.dtype)
    safe = torch.where(kappa > 0, kappa, 1.0)
    # log1p/expm1 form of the inverse CDF: exact for small kappa, no overflow for large kappa.
    w = 1.0 + torch.log1p((1.0 - u) * torch.expm1(-2.0 * safe)) / safe
    w = torch.where(kappa > 0, w, 2.0 * u - 1.0).clamp(-1.0, 1.0)
    r = torch.sqrt(1.0 - w * w)
    phi = 2 * math.pi * phi
    around_z = torch.stack([r * phi.cos(), r * phi.sin(), w], dim=-1)
    # Any rotation taking e_z to mu works because the law is symmetric about mu; A^T is one.
    to_mu = directions_to_rotations(mu, psi=torch.zeros_like(w)).transpose(-1, -2)
    return (to_mu @ around_z[..., None])[..., 0]


class PoseSampler:
    """Poses from a distribution of viewing directions with a uniform in-plane angle.

    Subclasses provide ``sample_directions(n, generator, device, dtype) -> (n, 3)``.
    """

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``n`` RELION pose matrices ``(n, 3, 3)``: directions from the distribution, in-plane
        angle uniform."""
        d = self.sample_directions(n, generator=generator, device=device, dtype=dtype)
        return directions_to_rotations(d, generator=generator)


@dataclass
class ViewingDistribution(PoseSampler):
    """Mixture of von Mises-Fisher distributions of viewing directions, in-plane angle uniform.

    Attributes:
        weights: ``K`` non-negative mixture weights (normalised when sampling).
        means: ``K`` mean directions ``(x, y, z)`` in the volume frame (normalised when sampling).
        kappas: ``K`` concentrations ``>= 0``; ``0`` is the uniform sphere.
    """

    weights: Sequence[float]
    means: Sequence[Sequence[float]]
    kappas: Sequence[float]

    def __post_init__(self) -> None:
        k = len(self.weights)
        if k == 0 or len(self.means) != k or len(self.kappas) != k:
            raise ValueError("weights, means and kappas must be non-empty and of equal length")
        if min(self.weights) < 0 or sum(self.weights) <= 0 or min(self.kappas) < 0:
            raise ValueError("weights and kappas must be non-negative, with a positive weight")

    @classmethod
    def uniform(cls) -> ViewingDistribution:
        """Uniform viewing directions (gives Haar-distributed poses)."""
        return cls(weights=[1.0], means=[[0.0, 0.0, 1.0]], kappas=[0.0])

    def sample_directions(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``n`` viewing directions, ``(n, 3)`` unit vectors ``(x, y, z)``."""
        weights = torch.as_tensor(self.weights, device=device, dtype=torch.float64)
        means = torch.as_tensor(self.means, device=device, dtype=dtype)
        kappas = torch.as_tensor(self.kappas, device=device, dtype=dtype)
        comp = torch.multinomial(weights, n, replacement=True, generator=generator)
        return sample_vmf(means[comp], kappas[comp], n, generator=generator)



def geodesic_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle of the rotation ``a^T b`` in degrees, ``(..., 3, 3), (..., 3, 3) -> (...)``.

    Uses ``atan2(|axis vector|, trace - 1)``, which is accurate at 0 and 180 degrees where
    ``acos`` loses precision (and never returns NaN).
    """
    r = a.transpose(-1, -2) @ b
    v = torch.stack(
        [r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], dim=-1
    )
    trace = r.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.atan2(v.norm(dim=-1), trace - 1.0).rad2deg()


@dataclass
class RegistrationResult:
    """Output of :func:`register_rotations`.

    Attributes:
        aligned: ``(n, 3, 3)`` estimated poses mapped onto the reference frame.
        rotation: ``(3, 3)`` global rotation ``Q`` of the model (see :func:`register_rotations`).
        reflected: whether the estimate has the opposite hand.
        errors: ``(n,)`` geodesic distance between ``aligned`` and the reference, degrees.
        mean_error: mean of ``errors``, degrees.
        median_error: median of ``errors``, degrees.
    """

    aligned: torch.Tensor
    rotation: torch.Tensor
    reflected: bool
    errors: torch.Tensor
    mean_error: float
    median_error: float


def _procrustes(ref: torch.Tensor, est: torch.Tensor) -> torch.Tensor:
    """Rotation ``Q`` minimising ``sum_i ||ref_i Q - est_i||_F^2`` (SVD of ``sum ref_i^T est_i``)."""
    m = (ref.transpose(-1, -2) @ est).sum(0).double()
    u, _, vh = torch.linalg.svd(m)
    d = torch.ones(3, dtype=m.dtype, device=m.device)
    d[2] = torch.linalg.det(u @ vh).sign()
    return ((u * d) @ vh).to(est.dtype)


def register_rotations(est: torch.Tensor, ref: torch.Tensor) -> RegistrationResult:
    """Align estimated poses onto reference poses, up to a global rotation and handedness.

    Model. If the reconstructed volume is ``V_est(x) = V(Q x)`` for a rotation ``Q``, then
    ``V(A^T r) = V_est((A Q)^T r)``: the same images are explained by poses ``A_est = A_ref Q``.
    Images cannot fix the hand either: with ``J = diag(1, 1, -1)``, the mirrored volume
    ``V(J x)`` under poses ``J A J`` gives ``V(A^T J r)``, and ``J`` only negates z, which the
    projection sums over. Hence, in general, ``A_est_i ~ A_ref_i Q`` or ``A_est_i ~ J A_ref_i J Q``.
    Each case is an orthogonal Procrustes problem solved in closed form (SVD projected onto
    SO(3)); the case with the lower mean error wins.

    Args:
        est: ``(n, 3, 3)`` estimated poses.
        ref: ``(n, 3, 3)`` reference (ground-truth) poses.

    Returns:
        A :class:`RegistrationResult`; ``aligned = est Q^T`` (or ``J est Q^T J`` when reflected).
    """
    ref = ref.to(est)
    j = torch.tensor(_J_DIAG, dtype=est.dtype, device=est.device)
    best = None
    for reflected in (False, True):
        # J X J for diagonal J: scale rows and columns.
        model_ref = j[:, None] * ref * j if reflected else ref
        q = _procrustes(model_ref, est)
        aligned = est @ q.T
        if reflected:
            aligned = j[:, None] * aligned * j
        errors = geodesic_distance(aligned, ref)
        if best is None or errors.mean() < best.errors.mean():
            best = RegistrationResult(
                aligned=aligned,
                rotation=q,
                reflected=reflected,
                errors=errors,
                mean_error=float(errors.mean()),
                median_error=float(errors.median()),
            )
    assert best is not None
    return best


def rotvec_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula: axis-angle vectors to active rotation matrices.

    ``R = I + sin(t) K + (1 - cos(t)) K^2`` with ``t = |r|`` and ``K`` the cross-product matrix of
    ``r / t``, written as ``I + a [r]x + b [r]x^2`` with ``a = sin(t)/t`` and
    ``b = (1 - cos(t))/t^2`` so that ``r = 0`` needs no special case (Taylor series below 1e-4).

    Args:
        rotvec: ``(..., 3)`` rotation vectors (axis times angle in radians), ``(x, y, z)``.

    Returns:
        ``(..., 3, 3)`` rotation matrices, same dtype and device (scipy's ``from_rotvec``).
    """
    t2 = (rotvec * rotvec).sum(-1)
    t = t2.sqrt()
    small = t < 1e-4
    safe_t = torch.where(small, torch.ones_like(t), t)
    a = torch.where(small, 1 - t2 / 6, safe_t.sin() / safe_t)
    b = torch.where(small, 0.5 - t2 / 24, (1 - safe_t.cos()) / (safe_t * safe_t))
    x, y, z = rotvec.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack(
        [torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1), torch.stack([-y, x, zero], -1)], -2
    )
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)
