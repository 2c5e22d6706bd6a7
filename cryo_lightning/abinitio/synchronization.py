"""Rotations from common lines by synchronization voting (Shkolnisky and Singer, 2012).

For a pair of images the common line fixes the 2x2 upper-left block of ``A_i A_j^T``::

    (A_i A_j^T)[:2, :2] = R2(theta_ij) diag(1, cos a_ij) R2(theta_ji)^T,

where ``R2`` is a 2D rotation and ``cos a_ij = d_i . d_j`` is the cosine of the angle between the
two viewing directions. One pair cannot give ``cos a_ij``; every third image ``k`` can, from the
spherical triangle formed by the three common lines. With oriented lines (``c_ij`` and ``c_ji``
the same 3D direction ``n_ij``, see ``abinitio.common_lines``) and ``n_ik``, ``n_jk`` written in the
planes of ``i`` and ``j``::

    n_ik . n_jk = cos(t_ik - t_ij) cos(t_jk - t_ji) + sin(t_ik - t_ij) sin(t_jk - t_ji) cos a_ij,

and ``n_ik . n_jk = cos(t_ki - t_kj)`` is read off image ``k``. The estimate is invariant to
flipping the orientation of any pair, so the arbitrary sign of each detected line does not matter.
Wrong common lines give scattered estimates; a histogram vote over ``k`` keeps the consistent ones.

The blocks fill a ``2N x 2N`` matrix ``S = W W^T`` of rank 3, where block row ``i`` of ``W`` is
``A_i[:2]``. Its top three eigenvectors span the columns of ``W``; the 3x3 mixing matrix is fixed
by requiring each image's two rows to be orthonormal, and the third row is their cross product.

Handedness. Projections are unchanged under ``V(x) -> V(J x)`` with poses ``A -> J A J``
(``J = diag(1, 1, -1)``), so common lines cannot tell a molecule from its mirror image: the
estimated poses are ``A_i Q`` or ``J A_i J Q`` for one global rotation ``Q``, and the map built
from them may be the mirror image. Check the hand against prior knowledge (e.g. right-handed
alpha helices in a high-resolution map) and flip the map (``V[::-1]`` along z) if needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SyncResult", "vote_plane_cosines", "sync_matrix", "rotations_from_sync", "estimate_rotations"]


@dataclass
class SyncResult:
    """Rotations estimated from common lines.

    Attributes:
        rotations: ``(N, 3, 3)`` RELION matrices, up to a global rotation and handedness.
        cosines: ``(N, N)`` voted ``d_i . d_j`` (cosine of the angle between viewing directions).
        support: ``(N, N)`` fraction of third images whose vote agreed with the chosen value.
        eigenvalues: the leading eigenvalues of the synchronization matrix (three large ones and
            a gap indicate a consistent set of common lines).
    """

    rotations: torch.Tensor
    cosines: torch.Tensor
    support: torch.Tensor
    eigenvalues: torch.Tensor


def vote_plane_cosines(
    angles: torch.Tensor, n_bins: int = 90, sigma_deg: float = 3.0, min_sine: float = 0.1,
    n_voters: int | None = 512, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos a_ij = d_i . d_j`` for every pair by voting over all third images.

    Args:
        angles: ``(N, N)`` oriented common-line angles (radians), as from
            :func:`~cryo_lightning.abinitio.common_lines.detect_common_lines`.
        n_bins: histogram bins over ``a`` in ``[0, pi]``.
        sigma_deg: width of the Gaussian that smooths the histogram, and of the window around its
            peak whose votes are averaged (degrees).
        min_sine: triangles whose sines are smaller (nearly collinear lines) do not vote.
        n_voters: third images that vote, a seeded random subset when there are more (the cost
            is ``N^2 n_voters`` instead of ``N^3``; a few hundred votes make a clear peak). None:
            all of them.
        seed: seed of that subset.
    Returns:
        ``(cosines, support)``, both ``(N, N)``; the diagonal is ``(1, 1)``.
    """
    N = angles.shape[0]
    # float64 for exact inputs (tests), else the input's precision: the cost is elementwise.
    dtype = torch.float64 if angles.dtype == torch.float64 else torch.float32
    device = angles.device
    t = angles.to(dtype)
    # Angle differences through cos/sin tables: products instead of trigonometric calls.
    C, S = torch.cos(t), torch.sin(t)
    centres = (torch.arange(n_bins, device=device, dtype=dtype) + 0.5) * math.pi / n_bins
    sigma = math.radians(sigma_deg)
    offsets = torch.arange(-n_bins, n_bins + 1, device=device, dtype=dtype) * math.pi / n_bins
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel[kernel > 1e-3]
    cosines = torch.eye(N, dtype=dtype, device=device)
    support = torch.eye(N, dtype=dtype, device=device)
    ks = torch.arange(N, device=device)
    if n_voters is not None and n_voters < N:
        g = torch.Generator().manual_seed(seed)
        ks = torch.randperm(N, generator=g)[:n_voters].sort().values.to(device)
    C_ik, S_ik = C[:, ks], S[:, ks]  # (N, K): image i's line towards voter k
    C_ki, S_ki = C[ks].T, S[ks].T  # (N, K): voter k's line towards image i
    for i in range(N - 1):
        js = torch.arange(i + 1, N, device=device)
        # Rows: pairs (i, j); columns: voters k. a_i = t_ik - t_ij, a_j = t_jk - t_ji, a_k = t_ki - t_kj.
        cos_ai = C_ik[i][None] * C[i, js][:, None] + S_ik[i][None] * S[i, js][:, None]
        sin_ai = S_ik[i][None] * C[i, js][:, None] - C_ik[i][None] * S[i, js][:, None]
        cos_aj = C_ik[js] * C[js, i][:, None] + S_ik[js] * S[js, i][:, None]
        sin_aj = S_ik[js] * C[js, i][:, None] - C_ik[js] * S[js, i][:, None]
        cos_ak = C_ki[i][None] * C_ki[js] + S_ki[i][None] * S_ki[js]
        sines = sin_ai * sin_aj
        valid = sines.abs() > min_sine**2
        cos_a = (cos_ak - cos_ai * cos_aj) / torch.where(valid, sines, torch.ones_like(sines))
        valid &= (cos_a.abs() <= 1.0 + 1e-3) & (ks[None, :] != i) & (ks[None, :] != js[:, None])
        alpha = torch.arccos(cos_a.clamp(-1, 1))
        bins = (alpha * (n_bins / math.pi)).long().clamp(0, n_bins - 1)
        hist = torch.zeros(len(js), n_bins, dtype=dtype, device=device)
        hist.scatter_add_(1, bins, valid.to(dtype))
        smooth = torch.nn.functional.conv1d(hist[:, None], kernel[None, None], padding=len(kernel) // 2)[:, 0]
        peak = centres[smooth.argmax(-1)]
        near = valid & ((alpha - peak[:, None]).abs() <= 2 * sigma)
        count = near.sum(-1)
        mean_alpha = torch.where(count > 0, (alpha * near).sum(-1) / count.clamp_min(1), peak)
        cosines[i, js] = cosines[js, i] = torch.cos(mean_alpha)
        frac = count / valid.sum(-1).clamp_min(1)
        support[i, js] = support[js, i] = frac.to(dtype)
    return cosines.to(angles.dtype), support.to(angles.dtype)


def _rotation_2d(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def sync_matrix(angles: torch.Tensor, cosines: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The ``2N x 2N`` synchronization matrix whose block ``(i, j)`` estimates ``(A_i A_j^T)[:2, :2]``.

    Args:
        angles: ``(N, N)`` oriented common-line angles (radians).
        cosines: ``(N, N)`` ``d_i . d_j`` (diagonal 1).
        weights: optional ``(N, N)`` confidence per pair (e.g. the voting support), which scales
            each block so that pairs with inconsistent common lines count less.
    """
    N = angles.shape[0]
    t = angles.double()
    diag = torch.zeros(N, N, 2, 2, dtype=torch.float64, device=t.device)
    diag[..., 0, 0] = 1.0
    diag[..., 1, 1] = cosines.double()
    blocks = _rotation_2d(t) @ diag @ _rotation_2d(t.T).transpose(-1, -2)
    if weights is not None:
        blocks = blocks * weights.double()[..., None, None]
    blocks[torch.arange(N), torch.arange(N)] = torch.eye(2, dtype=torch.float64, device=t.device)
    return blocks.permute(0, 2, 1, 3).reshape(2 * N, 2 * N)


def _top_eigenvectors(S: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if S.shape[0] <= 2000:
        values, vectors = torch.linalg.eigh(S)
        return values.flip(0)[:k], vectors.flip(1)[:, :k]
    # Large N: subspace iteration with a few extra vectors (S is PSD-like with a big gap).
    g = torch.Generator(device=S.device).manual_seed(0)
    Q = torch.linalg.qr(torch.randn(S.shape[0], k + 5, generator=g, device=S.device, dtype=S.dtype)).Q
    for _ in range(100):
        Q = torch.linalg.qr(S @ Q).Q
    values, small = torch.linalg.eigh(Q.T @ S @ Q)
    order = values.argsort(descending=True)[:k]
    return values[order], Q @ small[:, order]


def rotations_from_sync(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Poses from a synchronization matrix ``(2N, 2N)``.

    Returns:
        ``(rotations, eigenvalues)``: ``(N, 3, 3)`` RELION matrices (up to a global rotation and
        handedness) and the five leading eigenvalues.
    """
    N = S.shape[0] // 2
    values, vectors = _top_eigenvectors(S.double(), 5)
    V = vectors[:, :3].reshape(N, 2, 3)
    # W = V C with C C^T = G: solve v1 G v1 = 1, v2 G v2 = 1, v1 G v2 = 0 for symmetric G.
    def sym_terms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        outer = a[:, :, None] * b[:, None, :]
        outer = outer + outer.transpose(1, 2)
        iu = torch.triu_indices(3, 3)
        scale = torch.where(iu[0] == iu[1], 0.5, 1.0).to(outer)
        return outer[:, iu[0], iu[1]] * scale
    A = torch.cat([sym_terms(V[:, 0], V[:, 0]), sym_terms(V[:, 1], V[:, 1]), sym_terms(V[:, 0], V[:, 1])])
    rhs = torch.cat([torch.ones(2 * N, dtype=A.dtype, device=A.device), torch.zeros(N, dtype=A.dtype, device=A.device)])
    g = torch.linalg.lstsq(A, rhs[:, None]).solution[:, 0]
    iu = torch.triu_indices(3, 3)
    G = torch.zeros(3, 3, dtype=A.dtype, device=A.device)
    G[iu[0], iu[1]] = g
    G = G + G.T - torch.diag(G.diagonal())
    evals, evecs = torch.linalg.eigh(G)
    C = evecs @ torch.diag(evals.clamp_min(1e-12).sqrt())
    rows = V @ C  # (N, 2, 3)
    U, _, Vh = torch.linalg.svd(rows, full_matrices=False)
    rows = U @ Vh  # nearest pair of orthonormal rows
    third = torch.cross(rows[:, 0], rows[:, 1], dim=-1)
    return torch.cat([rows, third[:, None]], 1), values


def estimate_rotations(angles: torch.Tensor, weighted: bool = True, **vote_kwargs) -> SyncResult:
    """Common-line angles ``(N, N)`` -> poses, by voting and synchronization (see module doc).

    Args:
        angles: ``(N, N)`` oriented common-line angles (radians).
        weighted: weight each pair by its voting support (with 20% random common lines this
            halves the rotation error; see tests/abinitio/test_synchronization.py).
        **vote_kwargs: passed to :func:`vote_plane_cosines`.
    """
    cosines, support = vote_plane_cosines(angles, **vote_kwargs)
    rotations, values = rotations_from_sync(sync_matrix(angles, cosines, support if weighted else None))
    return SyncResult(rotations.to(angles.dtype), cosines, support, values.to(angles.dtype))
