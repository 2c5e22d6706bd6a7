"""The normal equations of the CWF's covariance estimate, solved by preconditioned conjugate gradients.

The least-squares covariance of one angular block
(:func:`~cryo_lightning.denoise.block_moments.estimate_block_moments`) solves
``sum_g w_g A_g C A_g = b`` for Hermitian ``C``, with ``A_g`` the (grouped) squared CTF operators
and ``b`` the shrunk second moment. Conjugate gradients with the preconditioner
``X -> M^-1 X M^-1`` (``M = mean_i A_i``) need only a few iterations; without CTF the solution is
the shrunk second moment itself and no solve is needed.
"""

from __future__ import annotations

import torch

__all__ = ["solve_normal_equations"]


def solve_normal_equations(
    A_groups: torch.Tensor, weights: torch.Tensor, rhs: torch.Tensor, M_inv: torch.Tensor,
    max_iter: int = 200, tol: float = 1e-6,
) -> torch.Tensor:
    """Solve ``sum_g w_g A_g X A_g = rhs`` for Hermitian ``X`` by preconditioned CG, batched.

    With many groups the operator is assembled once as the ``Q^2 x Q^2`` matrix
    ``sum_g w_g A_g (x) A_g``, so that an iteration costs one matrix-vector product whatever the
    number of groups; with few groups it is applied as the sum.

    Args:
        A_groups: ``(B, G, Q, Q)`` real symmetric.
        weights: ``(B, G)``.
        rhs: ``(B, Q, Q)`` complex Hermitian.
        M_inv: ``(B, Q, Q)`` real symmetric preconditioner (``X -> M_inv X M_inv``).
    Returns:
        ``(B, Q, Q)`` complex.
    """
    B, G, Q, _ = A_groups.shape
    # Real and imaginary parts decouple (the operator is real): solve both as two channels.
    b = torch.stack([rhs.real, rhs.imag], dim=1)  # (B, 2, Q, Q)
    P = M_inv[:, None]
    if G > 2 * Q:
        # K[(i, j), (k, l)] = sum_g w_g A_g[i, k] A_g[l, j]  (A_g symmetric)
        flat = A_groups.reshape(B, G, Q * Q)
        K = (flat * weights[..., None]).transpose(1, 2) @ flat  # (B, (i, k), (j, l))
        K = K.reshape(B, Q, Q, Q, Q).permute(0, 1, 3, 2, 4).reshape(B, Q * Q, Q * Q)

        def op(x: torch.Tensor) -> torch.Tensor:
            return (K @ x.reshape(B, 2, Q * Q).transpose(1, 2)).transpose(1, 2).reshape(B, 2, Q, Q)
    else:
        A, w = A_groups[:, :, None], weights[:, :, None, None, None]

        def op(x: torch.Tensor) -> torch.Tensor:
            return (w * (A @ x[:, None] @ A)).sum(1)

    def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # Re tr(U^H V) of the complex matrices
        return (u * v).sum((1, 2, 3))

    x = P @ b @ P
    r = b - op(x)
    z = P @ r @ P
    p = z
    rz = dot(r, z)
    b_norm = dot(b, b).sqrt()
    for _ in range(max_iter):
        if bool((dot(r, r).sqrt() <= tol * b_norm).all()):
            break
        q = op(p)
        alpha = rz / dot(p, q).clamp_min(1e-300)
        x = x + alpha[:, None, None, None] * p
        r = r - alpha[:, None, None, None] * q
        z = P @ r @ P
        rz_new = dot(r, z)
        p = z + (rz_new / rz.clamp_min(1e-300))[:, None, None, None] * p
        rz = rz_new
    return torch.complex(x[:, 0], x[:, 1])
