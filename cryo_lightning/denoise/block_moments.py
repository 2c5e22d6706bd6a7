"""Mean and covariance of the projections' coefficients in one angular block, estimated per set.

These are the statistics of the covariance Wiener filter (model and notation in
:mod:`cryo_lightning.denoise.cwf`: ``y_i = H_i x_i + n_i`` in the steerable basis, ``A_i = H_i^T H_i``).
Per set and per block:

1. Mean (``k = 0`` only): least squares ``mu = (sum_i A_i)^-1 sum_i H_i y_i``.
2. Covariance: the normal equations of ``min_C sum_i ||r_i r_i^H - H_i C H_i^T - sigma^2 I||_F^2``
   (``r_i = y_i - H_i mu``)::

       sum_i A_i C A_i = sum_i H_i r_i r_i^H H_i - sigma^2 sum_i A_i.

   As in ASPIRE's ``RotCov2D`` (``shrinker="frobenius_norm"``), the right-hand side is whitened
   by ``S = (mean_i A_i)^{1/2}``, its eigenvalues are shrunk with the Frobenius-optimal
   spiked-covariance shrinker of Donoho, Gavish & Johnstone (:func:`shrink_eigenvalues`, aspect
   ratio ``Q_k / N``; this also removes the noise term), and it is un-whitened. The equations are
   solved by preconditioned conjugate gradients (:mod:`cryo_lightning.denoise.normal_equations`),
   with ``A_i`` replaced by its CTF group's mean in the left-hand side when a set has many images
   (:mod:`cryo_lightning.denoise.ctf_groups`). The solution is made positive semidefinite by
   clipping negative eigenvalues.

With ``reflection_invariant`` the statistics are also those of the mirrored images (ASPIRE's
``do_refl``): the covariance is real symmetric instead of Hermitian.
"""

from __future__ import annotations

import torch

from cryo_lightning.denoise.block_algebra import hermitian_part, real_matmul
from cryo_lightning.denoise.normal_equations import solve_normal_equations

__all__ = ["shrink_eigenvalues", "estimate_block_moments", "signal_power"]


def shrink_eigenvalues(eigenvalues: torch.Tensor, noise_variance: torch.Tensor, gamma: float) -> torch.Tensor:
    """Frobenius-optimal shrinkage of sample-covariance eigenvalues in a spiked model.

    For white noise of variance ``sigma^2`` and aspect ratio ``gamma = dimension / samples``,
    eigenvalues below the bulk edge ``sigma^2 (1 + sqrt(gamma))^2`` become 0; above it the
    population spike ``ell`` (in units of ``sigma^2``) is inverted from the sample eigenvalue,
    ``ell = ((x + 1 - gamma) + sqrt((x + 1 - gamma)^2 - 4 x)) / 2`` with ``x = lambda / sigma^2``,
    and the signal eigenvalue ``sigma^2 (ell - 1) c^2`` is returned, where
    ``c^2 = (1 - gamma / (ell - 1)^2) / (1 + gamma / (ell - 1))`` is the squared cosine between
    sample and population eigenvectors (Donoho, Gavish & Johnstone 2018).

    Args:
        eigenvalues: ``(B, Q)`` real.
        noise_variance: ``(B,)``.
        gamma: dimension / number of samples.
    Returns:
        ``(B, Q)`` non-negative signal eigenvalues.
    """
    s2 = noise_variance[:, None].to(eigenvalues.dtype)
    x = eigenvalues / s2
    edge = (1 + gamma**0.5) ** 2
    t = x + 1 - gamma
    ell = 0.5 * (t + (t * t - 4 * x).clamp_min(0).sqrt())
    spike = (ell - 1).clamp_min(1e-30)
    c2 = ((1 - gamma / spike**2) / (1 + gamma / spike)).clamp_min(0)
    return torch.where(x > edge, s2 * spike * c2, torch.zeros_like(x))
def estimate_block_moments(
    y: torch.Tensor,
    noise_variance: torch.Tensor,
    H: torch.Tensor | None = None,
    *,
    with_mean: bool = False,
    shrinkage: bool = True,
    reflection_invariant: bool = True,
    groups: tuple[torch.Tensor, int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Mean and covariance of the projections' coefficients in one angular block.

    Args:
        y: ``(B, N, Q)`` complex coefficients of the images of ``B`` sets.
        noise_variance: ``(B,)`` per-pixel noise variance.
        H: ``(B, N, Q, Q)`` real CTF operators of the block, or None (no CTF).
        with_mean: estimate a mean (only the ``k = 0`` block has one); else it is 0.
        shrinkage: eigenvalue shrinkage of the whitened second moment (else the noise term is
            subtracted and the result clipped).
        reflection_invariant: also use the reflected images (``y -> conj(y)``), i.e. estimate a
            real symmetric covariance (ASPIRE's ``do_refl``); else a Hermitian one.
        groups: ``(labels (B, N), G)`` from :func:`~cryo_lightning.denoise.ctf_groups.ctf_groups`
            for the covariance's left-hand side (default: every image its own group).
    Returns:
        mean ``(B, Q)`` complex or None, covariance ``(B, Q, Q)`` complex Hermitian PSD.
    """
    B, N, Q = y.shape
    y = y.to(torch.complex128)
    s2 = noise_variance.to(torch.float64).reshape(B)
    eye = torch.eye(Q, dtype=torch.float64, device=y.device)
    mean = None
    if H is None:
        if with_mean:
            mean = y.mean(1)
            y = y - mean[:, None]
        b = hermitian_part(y.transpose(1, 2) @ y.conj() / N)
        M_evals = torch.ones(B, Q, dtype=torch.float64, device=y.device)
        M_evecs = eye.expand(B, Q, Q)
    else:
        H = H.to(torch.float64)
        A = H @ H
        M = A.mean(1)
        if with_mean:
            rhs = real_matmul(H, y[..., None]).squeeze(-1).mean(1)
            ridge = 1e-10 * M.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye
            mean = torch.linalg.solve((M + ridge).to(torch.complex128), rhs)
            y = y - real_matmul(H, mean[:, None, :, None].expand(B, N, Q, 1)).squeeze(-1)
        z = real_matmul(H, y[..., None]).squeeze(-1)
        b = hermitian_part(z.transpose(1, 2) @ z.conj() / N)
        M_evals, M_evecs = torch.linalg.eigh(hermitian_part(M))
        M_evals = M_evals.clamp_min(1e-12 * M_evals[:, -1:].clamp_min(1e-300))

    gamma = Q / N
    if reflection_invariant:
        # Adding the mirror images conj(y) (whose CTF is the same) averages b with conj(b). The
        # aspect ratio stays Q / N as in ASPIRE: treating real and imaginary parts as 2N samples
        # lowers the shrinkage threshold and measurably hurts small sets at low SNR.
        b = b.real.to(b.dtype)
    # Whiten (the noise part of b is sigma^2 M), shrink or subtract the noise, un-whiten.
    W = M_evecs.to(torch.complex128)
    S_half = W * M_evals.sqrt()[:, None, :].to(torch.complex128)  # S = W diag(sqrt m) W^H
    bw = W.transpose(1, 2).conj() @ b @ W / (M_evals.sqrt()[:, :, None] * M_evals.sqrt()[:, None, :])
    evals, evecs = torch.linalg.eigh(hermitian_part(bw))
    if shrinkage:
        evals = shrink_eigenvalues(evals, s2, gamma)
    else:
        evals = evals - s2[:, None]
    bw = (evecs * evals[:, None, :].to(torch.complex128)) @ evecs.transpose(1, 2).conj()
    b = S_half @ bw @ S_half.transpose(1, 2).conj()

    if H is None:
        C = b
    else:
        if groups is None or groups[1] == N:
            A_groups, counts = A, torch.ones(B, N, dtype=torch.float64, device=y.device)
        else:
            onehot = torch.nn.functional.one_hot(groups[0], groups[1]).to(torch.float64)  # (B, N, G)
            counts = onehot.sum(1)
            A_groups = (onehot.transpose(1, 2) @ A.reshape(B, N, Q * Q)).reshape(B, -1, Q, Q)
            A_groups = A_groups / counts.clamp_min(1)[..., None, None]
        M_inv = (M_evecs / M_evals[:, None, :]) @ M_evecs.transpose(1, 2)
        C = solve_normal_equations(A_groups, counts / N, b, M_inv)

    evals, evecs = torch.linalg.eigh(hermitian_part(C))
    C = (evecs * evals.clamp_min(0)[:, None, :].to(torch.complex128)) @ evecs.transpose(1, 2).conj()
    return mean, C


def signal_power(moments: list[tuple[torch.Tensor | None, torch.Tensor]]) -> torch.Tensor:
    """``|mu|^2 + sum_k tr C_k`` per set, ``(B,)``, from per-block (mean, covariance) estimates."""
    power = moments[0][0].abs().square().sum(-1)
    for _, C in moments:
        power = power + torch.diagonal(C, dim1=-2, dim2=-1).real.sum(-1)
    return power
