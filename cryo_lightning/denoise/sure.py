"""How much of a learned correction to trust, per spatial frequency, chosen from the noisy set itself
by Stein's unbiased risk estimate (SURE).

Setting: noisy images ``y = x + n`` with white Gaussian noise of per-pixel variance ``sigma^2``
and two estimates of the clean CTF-affected images ``x``: a classical ``guide g(y)`` (the radial
Wiener filter or the covariance Wiener filter of the set) and a network's ``correction c(y)``. The
blend, per one-pixel frequency ring ``k`` (``P_k`` keeps ring ``k`` of the centred 2D DFT)::

    f_w(y) = g(y) + sum_k w_k P_k c(y),    w_k in [0, 1],

is the guide at ``w = 0`` and the network's output at ``w = 1``. For any weakly differentiable
``f``, SURE (Stein 1981) is an unbiased estimate of the error against the clean images, from the
noisy images alone::

    E ||f(y) - x||^2 = E [ ||f(y) - y||^2 - d sigma^2 + 2 sigma^2 div f(y) ],

and it splits over rings (``P_k`` are orthogonal projectors and white noise stays white). The
ring-``k`` risk is quadratic in ``w_k``; its minimiser is::

    w_k = - ( <P_k (g - y), P_k c> + sigma^2 tr(P_k J_c) ) / ||P_k c||^2,

clipped to [0, 1], where ``J_c`` is the Jacobian of ``c`` as a function of all the noisy images
(through the guide's set statistics too). The divergence term is estimated by Monte Carlo
(Hutchinson; Ramani, Blu & Unser 2008): with a probe ``b ~ N(0, I)`` and a small ``eps``,
``tr(P_k J_c) ~ <P_k b, P_k (c(y + eps b) - c(y))> / eps``. Probing only the first ``S`` images of
a set of ``N`` (the others unperturbed) estimates those images' part of the trace without bias; it
is scaled by ``N / S``. One probe over hundreds of images is accurate: each ring's estimate sums
``S x (ring size)`` terms.

Why: a network trained on procedural molecules can be worse than the classical guide on a real
structure in some frequency band (the guide is fitted to *this* set, the prior is not). SURE lets
the data decide, per band, without ground truth, so the blend is never worse than the guide by
more than the estimate's noise, and is better where the prior helps. It assumes the white noise
model that the guides assume (background-normalised particles); coloured noise biases the
divergence penalty by the ratio of the ring's true noise power to ``sigma^2``.
"""

from __future__ import annotations

import torch

from cryo_lightning.physics.fourier import fft2c, ifft2c, radial_grid

__all__ = ["ring_index", "ring_inner", "sure_ring_weights", "apply_ring_weights"]

_CHUNK_PIXELS = 256 * 64 * 64  # images x pixels per FFT in ring_inner


def ring_index(L: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(L, L)`` int64: the one-pixel frequency ring ``round(|k|)`` of every sample of the centred
    DFT grid, the corners beyond ``L // 2`` joined to ring ``L // 2`` (``L // 2 + 1`` rings)."""
    return torch.round(radial_grid(L, 2, device=device)).long().clamp_max(L // 2)


def ring_inner(a: torch.Tensor, b: torch.Tensor, rings: torch.Tensor) -> torch.Tensor:
    """Per set and ring, ``sum_i Re <P_k a_i, P_k b_i>`` in pixel units (Parseval: the unnormalised
    DFT's inner product divided by ``L^2``).

    Args:
        a, b: ``(B, N, L, L)`` real images.
        rings: ``(L, L)`` from :func:`ring_index`.
    Returns:
        ``(B, K)`` float64 with ``K = rings.max() + 1``.
    """
    B, N, L = a.shape[0], a.shape[1], a.shape[-1]
    chunk = max(1, _CHUNK_PIXELS // (L * L))  # complex128 copies of a whole set at L = 256 would take gigabytes
    products = sum((fft2c(a[:, i:i + chunk].double()).conj() * fft2c(b[:, i:i + chunk].double())).real.sum(1)
                   for i in range(0, N, chunk))
    K = int(rings.max()) + 1
    out = torch.zeros(B, K, dtype=torch.float64, device=a.device)
    return out.index_add_(1, rings.flatten().to(a.device), products.reshape(B, -1) / (L * L))


def sure_ring_weights(noisy: torch.Tensor, guide: torch.Tensor, correction: torch.Tensor, probe: torch.Tensor,
                      probe_response: torch.Tensor, noise_variance: torch.Tensor,
                      max_weight: float = 1.0) -> torch.Tensor:
    """SURE-optimal weight of ``correction`` per set and frequency ring (module docstring).

    Args:
        noisy, guide, correction: ``(B, N, L, L)`` the noisy images, the guide and the correction.
        probe: ``(B, S, L, L)`` the standard normal probe added (times ``eps``) to the first ``S``
            images of each set.
        probe_response: ``(B, S, L, L)`` ``(c(y + eps b) - c(y)) / eps`` for those images.
        noise_variance: ``(B,)`` per-pixel noise variance of ``noisy``.
        max_weight: upper clip of the weights (1: never beyond the network's own output).
    Returns:
        ``(B, K)`` float64 weights in ``[0, max_weight]``; 0 where the correction has no power.
    """
    N, S, L = noisy.shape[1], probe.shape[1], noisy.shape[-1]
    rings = ring_index(L, noisy.device)
    power = ring_inner(correction, correction, rings)
    cross = ring_inner(guide - noisy, correction, rings)
    divergence = ring_inner(probe, probe_response, rings) * (N / S)
    s2 = noise_variance.to(torch.float64).reshape(-1, 1)
    w = -(cross + s2 * divergence) / power.clamp_min(1e-300)
    return torch.where(power > 0, w, torch.zeros_like(w)).clamp(0.0, max_weight)


def apply_ring_weights(images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k P_k images``: ``(B, N, L, L)`` real images, ``(B, K)`` weights -> ``(B, N, L, L)``
    (dtype of ``images``)."""
    L = images.shape[-1]
    gain = weights.to(images.dtype)[:, ring_index(L, images.device)]  # (B, L, L)
    return ifft2c(fft2c(images) * gain[:, None]).real.to(images.dtype)
