"""The moment loss of the method of moments: relative misfit of ``(M1, M2, M3)``.

Unknowns: the volume's SFB coefficients ``a`` and the viewing distribution's even-degree
coefficients ``b`` (``b_00 = 1`` fixed, so only ``b_lm, l >= 2`` are free). Loss (per CTF group
``g`` with image fraction ``w_g``; norms Frobenius over all blocks)::

    L(a, b) = sum_g w_g ||M1_g(a, b) - M1hat_g||^2 / ||M1hat||^2
            + sum_g w_g ||M2_g(a, b) - M2hat_g||^2 / ||M2hat||^2
            + mu * mean_j relu(-rho(u_j))^2                     (rho >= 0 on a sphere grid)

with ``||M||^2 = sum_g w_g ||M_g||^2``, plus optionally the same relative misfit of the
third-moment slice ``M3_k[t] = E[c_0t c_k c_k^H]`` (:mod:`~cryo_lightning.abinitio.image_moments`).
:func:`moment_loss` is the misfit without the positivity term, which the solver adds
(:mod:`~cryo_lightning.abinitio.moment_solver`). Whitened moments (every index scaled by
``1 / sqrt(E|c_i|^2)``, :func:`whitening_scales`) make high radial frequencies count.

Noise scale. With noisy moments the minimiser of ``L`` is itself off the truth.
:func:`expected_misfit` is the value ``L`` takes at the truth on average, computed from the
moments' sampling errors: the units of a prior's weight in a MAP fit, 0 for exact moments.
"""

from __future__ import annotations

import torch

from cryo_lightning.abinitio.image_moments import ImageMoments, squared_norm
from cryo_lightning.abinitio.moment_forward_model import MomentModel

__all__ = ["moment_loss", "expected_misfit", "whiten_moments", "whitening_scales"]


def moment_loss(
    model: MomentModel,
    a: torch.Tensor,
    b: torch.Tensor,
    target: ImageMoments,
    use_m2: bool = True,
    m2_weight: float = 1.0,
    use_m3: bool = False,
    m3_weight: float = 1.0,
    scales: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Relative moment misfit ``L(a, b)`` of the module docstring, without the positivity term.

    Args:
        model: forward model whose CTF groups match ``target``'s (built with ``third=True``
            for ``use_m3``).
        a: ``(count,)`` SFB coefficients.
        b: ``(b_count,)`` viewing coefficients, ``b_00`` included.
        target: empirical (or exact) moments (with ``m3`` for ``use_m3``).
        use_m2: include the ``M2`` term.
        m2_weight: factor on the ``M2`` term.
        use_m3: include the third-moment-slice term.
        m3_weight: factor on it.
        scales: per ``k``, ``(G, Q_k)`` factors applied to every index of every moment
            (:func:`whitening_scales`); ``None``: no scaling.
    Returns:
        scalar, differentiable in ``a`` and ``b``.
    """
    w = target.weights.to(a.device, a.dtype)
    if use_m3:
        if target.m3 is None:
            raise ValueError("use_m3 needs target moments with m3 (estimate them with third=True)")
        m1, m2, m3 = model.with_third(a, b)
    else:
        m1, m2 = model(a, b)
    t1, t2, t3 = target.m1, target.m2, target.m3
    if scales is not None:
        m1, m2, m3 = whiten_moments(m1, m2, m3 if use_m3 else None, scales)
        t1, t2, t3 = whiten_moments(t1, t2, t3 if use_m3 else None, scales)
    loss = (w * squared_norm(m1 - t1)).sum() / (w * squared_norm(t1)).sum().clamp_min(1e-300)

    def term(model_blocks, target_blocks):
        num = sum((w * squared_norm(mk - tk)).sum() for mk, tk in zip(model_blocks, target_blocks))
        den = sum((w * squared_norm(tk)).sum() for tk in target_blocks)
        return num / den.clamp_min(1e-300)

    if use_m2:
        loss = loss + m2_weight * term(m2, t2)
    if use_m3:
        loss = loss + m3_weight * term(m3, t3)
    return loss


def expected_misfit(target: ImageMoments, use_m3: bool = False) -> float:
    """The moment loss expected at the true ``(a, b)``: the estimates' sampling error in its units.

    Each term of :func:`moment_loss` at the truth is the weighted squared norm of the estimation
    error over that of the target, so its expectation is
    ``sum_g w_g E||M_hat_g - M_g||^2 / sum_g w_g ||M_hat_g||^2`` with the errors of
    :class:`~cryo_lightning.abinitio.image_moments.ImageMoments` (``m1_error``, ...). 0 for exact moments
    (no errors recorded). It sets the scale of a prior's weight
    (:func:`~cryo_lightning.abinitio.moment_solver.fit_moments`).
    """
    if target.m1_error is None:
        return 0.0
    w = target.weights

    def term(error: torch.Tensor, blocks: list[torch.Tensor]) -> float:
        den = sum((w * squared_norm(b)).sum() for b in blocks)
        return float((w * error.reshape(w.shape[0], -1).sum(-1)).sum() / den.clamp_min(1e-300))

    value = term(target.m1_error, [target.m1]) + term(target.m2_error, target.m2)
    if use_m3:
        if target.m3 is None or target.m3_error is None:
            raise ValueError("use_m3 needs target moments with m3 (estimate them with third=True)")
        value += term(target.m3_error, target.m3)
    return value


def whiten_moments(m1: torch.Tensor, m2: list[torch.Tensor], m3: list[torch.Tensor] | None, scales: list[torch.Tensor]
           ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None]:
    """Scale every index of ``M1``, ``M2`` and the ``M3`` slice by :func:`whitening_scales` (``m3`` may be ``None``)."""
    s0 = scales[0]
    m1 = m1 * torch.cat(scales, dim=-1)
    m2 = [m * (s[:, :, None] * s[:, None, :]) for m, s in zip(m2, scales)]
    if m3 is not None:
        m3 = [m * (s0[:, :, None, None] * s[:, None, :, None] * s[:, None, None, :]) for m, s in zip(m3, scales)]
    return m1, m2, m3


def whitening_scales(target: ImageMoments, floor: float = 1e-6) -> list[torch.Tensor]:
    """Per-coefficient factors ``1 / sqrt(E|c_i|^2)`` that whiten the moments entry by entry.

    ``E|c_i|^2`` is the diagonal of the (noise-inclusive) second moment, ``M2_ii + sigma^2``,
    floored at ``floor`` times its maximum. Scaling every index of ``M1``, ``M2`` and ``M3`` by it
    weighs high radial frequencies, whose moments are orders of magnitude smaller than the
    low-frequency ones, like the rest (with noise, roughly by their inverse standard error).

    Returns:
        per ``k``, ``(G, Q_k)`` float64.
    """
    power = [torch.diagonal(m, dim1=-2, dim2=-1).real + target.noise_variance[:, None] for m in target.m2]
    top = max(float(p.max()) for p in power)
    return [p.clamp_min(floor * top).rsqrt() for p in power]
