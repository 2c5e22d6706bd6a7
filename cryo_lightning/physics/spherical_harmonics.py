"""Real spherical harmonics, sphere quadrature and real Wigner D matrices.

Conventions (docs/conventions.md, section 15):

- Vectors are ``(x, y, z)`` in the project frame; the polar axis is ``z`` (the projection axis
  of the identity pose), ``theta`` is the angle from ``+z`` and ``phi = atan2(y, x)``.
- Real, orthonormal (``int_{S^2} Y_lm Y_l'm' = delta``), no Condon-Shortley phase::

      Y_l0  = N_l0 P_l(cos theta)
      Y_lm  = sqrt(2) N_lm P_l^m(cos theta) cos(m phi)        m > 0
      Y_l-m = sqrt(2) N_lm P_l^m(cos theta) sin(m phi)        m > 0

  with ``N_lm = sqrt((2l + 1) / (4 pi) (l - m)! / (l + m)!)`` and ``P_l^m`` without the
  ``(-1)^m`` phase. In terms of the complex harmonics (with that phase, as scipy's
  ``sph_harm_y``): ``Y_lm = sqrt(2) (-1)^m Re Y_l^m`` and ``Y_l-m = sqrt(2) (-1)^m Im Y_l^m``.
  So ``Y_1 = sqrt(3 / 4 pi) (y, z, x)``.
- Layout: all degrees ``0..l_max`` concatenated, ``m = -l..l`` within a degree; entry
  ``l^2 + l + m``, ``(l_max + 1)^2`` in all (e3nn's ordering).
- Parity: ``Y_lm(-u) = (-1)^l Y_lm(u)``.
- Wigner D: ``D_l(R)`` is the ``(2l+1, 2l+1)`` real orthogonal matrix with
  ``Y_l(R u) = D_l(R) Y_l(u)`` for an active rotation ``R``; hence ``D_l(R S) = D_l(R) D_l(S)``
  and ``D_1(R) = P R P^T`` with ``P`` the cyclic permutation ``(x, y, z) -> (y, z, x)``.
- e3nn 0.6 uses the same real harmonics with ``y`` as the polar axis: ``Y(v) =
  e3nn.o3.spherical_harmonics(l, P v, normalize=True, normalization="integral")`` and
  ``D_l(R) = e3nn.o3.Irrep(l, (-1)**l).D_from_matrix(P R P^T)`` (see :func:`to_e3nn_frame`).
  Pinned by tests/physics/test_spherical_harmonics.py.

Everything is pure torch, batched over leading axes, and follows the input's device; values are
computed in float64 and returned in the input's floating dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "sh_index",
    "sh_count",
    "real_spherical_harmonics",
    "sphere_quadrature",
    "wigner_d",
    "E3NN_PERMUTATION",
    "to_e3nn_frame",
]

# Rows pick (y, z, x) from (x, y, z): e3nn's harmonics take P v and see y as the polar axis.
E3NN_PERMUTATION = ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))


def sh_index(l: int, m: int) -> int:
    """Position of ``Y_lm`` in the concatenated layout: ``l^2 + l + m``."""
    if not -l <= m <= l:
        raise ValueError(f"need -l <= m <= l, got l={l}, m={m}")
    return l * l + l + m


def sh_count(l_max: int) -> int:
    """Number of harmonics of degrees ``0..l_max``: ``(l_max + 1)^2``."""
    return (l_max + 1) ** 2


def real_spherical_harmonics(l_max: int, vectors: torch.Tensor) -> torch.Tensor:
    """Real orthonormal spherical harmonics of degrees ``0..l_max`` (module docstring convention).

    Evaluated in Cartesian form, ``Y_lm = c_lm q_l^m(z) Re/Im (x + i y)^m`` with ``q`` a
    polynomial, so the poles need no special case. Vectors are normalised first; a zero vector
    is treated as the direction ``(0, 0, 0)`` and gives finite values (only ``Y_00`` is meaningful
    there).

    Args:
        l_max: highest degree ``>= 0``.
        vectors: ``(..., 3)`` real, ``(x, y, z)``; any non-zero length.

    Returns:
        ``(..., (l_max + 1)^2)`` in the dtype of ``vectors`` (computed in float64).
    """
    if l_max < 0:
        raise ValueError(f"l_max must be >= 0, got {l_max}")
    out_dtype = vectors.dtype if vectors.dtype.is_floating_point else torch.float64
    v = vectors.to(torch.float64)
    r = v.norm(dim=-1, keepdim=True)
    v = v / torch.where(r > 0, r, torch.ones_like(r))
    x, y, z = v.unbind(-1)

    # cos(m phi) sin^m(theta) and sin(m phi) sin^m(theta) as Re/Im of (x + i y)^m.
    cos_m, sin_m = [torch.ones_like(x)], [torch.zeros_like(x)]
    for _ in range(l_max):
        c, s = cos_m[-1], sin_m[-1]
        cos_m.append(x * c - y * s)
        sin_m.append(x * s + y * c)

    # q[l][m] = normalised associated Legendre function divided by sin^m(theta): the standard
    # stable recurrences of fully normalised P_l^m, with the sin(theta) factors taken out.
    q: list[list[torch.Tensor | None]] = [[None] * (l_max + 1) for _ in range(l_max + 1)]
    q[0][0] = torch.full_like(z, 1.0 / math.sqrt(4.0 * math.pi))
    for m in range(1, l_max + 1):
        q[m][m] = math.sqrt((2 * m + 1) / (2 * m)) * q[m - 1][m - 1]
    for m in range(0, l_max):
        q[m + 1][m] = math.sqrt(2 * m + 3) * z * q[m][m]
    for m in range(0, l_max + 1):
        for l in range(m + 2, l_max + 1):
            a = math.sqrt((4 * l * l - 1) / (l * l - m * m))
            b = math.sqrt(((l - 1) ** 2 - m * m) / (4 * (l - 1) ** 2 - 1))
            q[l][m] = a * (z * q[l - 1][m] - b * q[l - 2][m])

    cols = []
    for l in range(l_max + 1):
        for m in range(-l, l + 1):
            if m < 0:
                cols.append(math.sqrt(2.0) * q[l][-m] * sin_m[-m])
            elif m == 0:
                cols.append(q[l][0])
            else:
                cols.append(math.sqrt(2.0) * q[l][m] * cos_m[m])
    return torch.stack(cols, dim=-1).to(out_dtype)


def sphere_quadrature(
    degree: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Product quadrature on the unit sphere, exact for polynomials of total degree ``<= degree``.

    Gauss-Legendre in ``cos(theta)`` (``n = floor(degree / 2) + 1`` nodes, exact to degree
    ``2n - 1``) times ``2n`` equispaced angles ``phi`` (exact for trigonometric degree
    ``< 2n``).

    Args:
        degree: polynomial degree to integrate exactly (``>= 0``).

    Returns:
        ``nodes (Q, 3)`` unit vectors ``(x, y, z)`` and ``weights (Q,)`` summing to ``4 pi``.
    """
    n = degree // 2 + 1
    z, w = np.polynomial.legendre.leggauss(n)
    phi = 2.0 * np.pi * np.arange(2 * n) / (2 * n)
    zz, pp = np.meshgrid(z, phi, indexing="ij")
    s = np.sqrt(1.0 - zz * zz)
    nodes = np.stack([s * np.cos(pp), s * np.sin(pp), zz], axis=-1).reshape(-1, 3)
    weights = np.repeat(w * (np.pi / n), 2 * n)
    return (
        torch.as_tensor(nodes, device=device, dtype=dtype),
        torch.as_tensor(weights, device=device, dtype=dtype),
    )


def wigner_d(l_max: int, rotations: torch.Tensor) -> list[torch.Tensor]:
    """Real Wigner D matrices ``D_l(R)`` for ``l = 0..l_max``, with ``Y_l(R u) = D_l(R) Y_l(u)``.

    Computed by exact quadrature, ``D_l(R)[m, n] = int Y_lm(R u) Y_ln(u) du``, with
    :func:`sphere_quadrature` of degree ``2 l_max`` (the integrand's degree): accurate to
    rounding for any ``R`` and differentiable in ``R``. Cost and memory per rotation are about
    ``l_max^3`` (a few thousand rotations at ``l_max = 16`` are fine at once).

    Args:
        l_max: highest degree.
        rotations: ``(..., 3, 3)`` active rotation matrices acting on ``(x, y, z)`` column
            vectors (for a RELION pose ``A``, ``D_l(A)`` maps harmonics of volume directions to
            those of image-frame directions).

    Returns:
        list of ``(..., 2l + 1, 2l + 1)`` tensors in the dtype of ``rotations`` (float64 inside).
    """
    nodes, weights = sphere_quadrature(2 * l_max, device=rotations.device)
    r = rotations.to(torch.float64)
    y_rot = real_spherical_harmonics(l_max, torch.einsum("...ij,qj->...qi", r, nodes))  # (..., Q, n)
    y_ref = real_spherical_harmonics(l_max, nodes) * weights[:, None]  # (Q, n)
    out = []
    for l in range(l_max + 1):
        sl = slice(l * l, (l + 1) ** 2)
        out.append((y_rot[..., sl].transpose(-1, -2) @ y_ref[:, sl]).to(rotations.dtype))
    return out


def to_e3nn_frame(x: torch.Tensor, kind: str = "vector") -> torch.Tensor:
    """Express project-frame vectors or rotations in the frame where e3nn's harmonics equal ours.

    With ``P`` = :data:`E3NN_PERMUTATION`, ``(x, y, z) -> (y, z, x)``:
    ``real_spherical_harmonics(l_max, v)`` equals e3nn's ``spherical_harmonics(l, P v,
    normalize=True, normalization="integral")`` concatenated over ``l``, and ``wigner_d(l_max,
    R)[l]`` equals ``e3nn.o3.Irrep(l, (-1)**l).D_from_matrix(P R P^T)``. Coefficient vectors in
    this module's layout are therefore e3nn irreps ``"lo"``/``"le"`` (parity ``(-1)^l``) under
    the rotation ``P R P^T``.

    Args:
        x: ``(..., 3)`` vectors (``kind="vector"``) or ``(..., 3, 3)`` matrices (``kind="rotation"``).
        kind: ``"vector"`` -> ``P x``; ``"rotation"`` -> ``P x P^T``.
    """
    p = torch.tensor(E3NN_PERMUTATION, dtype=x.dtype, device=x.device)
    if kind == "vector":
        return x @ p.T
    if kind == "rotation":
        return p @ x @ p.T
    raise ValueError(f"kind must be 'vector' or 'rotation', got {kind!r}")
