"""A Gaussian prior on SFB volume coefficients, fitted to a bank of molecules, O(3)-invariant.

Moments of noisy images pin a volume down only loosely: the minimiser of the moment loss lies
off the truth even when the fit starts at it, because many directions of the coefficient space
barely change the moments (abinitio/moment_solver.py, identifiability). A prior fitted to the training molecules
fills them in (docs/benchmarks.md: learned reconstructor).

The prior is the O(3)-invariant Gaussian closest to the bank: per degree ``l`` a radial
covariance ``C_l`` (``S_l x S_l``) shared by the ``2l + 1`` orders ``m``, and a mean only in the
invariant degree 0::

    a_l0m ~ N(mu, C_0),   a_lm ~ N(0, C_l)  (l >= 1),   independent over l and m

A rotation acts on the ``m`` index of each degree by an orthogonal matrix and a mirror by
``(-1)^l``, neither touches the radial index, so the density is invariant under both. The energy
is the negative log density up to a constant, per coefficient::

    E(a) = (1 / count) sum_l sum_m (a_lm - mu_l)^T C_l^-1 (a_lm - mu_l)     (about 1 under the prior)

Coefficients are in the layout of
:class:`~cryo_lightning.physics.fourier_bessel.SphericalFourierBesselBasis` (``l``, then ``s``,
then ``m``); the irreps string (``"7x0e+7x1o+7x2e"``) gives the radial counts ``S_l``.
"""

from __future__ import annotations

import torch
from e3nn import o3
from torch import nn

from cryo_lightning.physics.fourier_bessel import SFBLayout

__all__ = ["CoefficientPrior"]


class CoefficientPrior(nn.Module):
    """O(3)-invariant Gaussian prior on SFB coefficients (module docstring).

    Args:
        volume_irreps: irreps of the coefficients, one ``S_l x l`` entry per degree present.
        ridge: added to each ``C_l``'s diagonal, relative to its mean diagonal, before inversion.

    Buffers (saved with a checkpoint): ``mean`` ``(S_0,)`` and ``precision_<l>`` ``(S_l, S_l)``
    (``0 x 0`` for a degree absent from the irreps); ``fitted`` is 0 until :meth:`fit`.
    """

    def __init__(self, volume_irreps: str | o3.Irreps, ridge: float = 1e-6) -> None:
        super().__init__()
        irreps = o3.Irreps(volume_irreps)
        degrees = [ir.l for _, ir in irreps]
        if sorted(set(degrees)) != degrees:
            raise ValueError(f"expected one entry per degree in ascending order, got {irreps}")
        counts = [0] * (irreps.lmax + 1)
        for mul, ir in irreps:
            counts[ir.l] = mul
        self.layout, self.count, self.ridge = SFBLayout(tuple(counts)), irreps.dim, float(ridge)
        self.register_buffer("mean", torch.zeros(counts[0], dtype=torch.float64))
        for l, s in enumerate(counts):
            self.register_buffer(f"precision_{l}", torch.eye(s, dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.float64))

    def _blocks(self, a: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``(degree, (..., S_l, 2l + 1))`` of every degree present in ``(..., count)``."""
        return [(l, blk) for l, blk in enumerate(self.layout.blocks(a)) if blk.shape[-2] > 0]

    @torch.no_grad()
    def fit(self, coeffs: torch.Tensor) -> CoefficientPrior:
        """Fit mean and covariances to ``(M, count)`` coefficients of ``M`` molecules; returns self."""
        if coeffs.ndim != 2 or coeffs.shape[-1] != self.count:
            raise ValueError(f"expected (M, {self.count}) coefficients, got {tuple(coeffs.shape)}")
        x = coeffs.to(torch.float64)
        for l, blk in self._blocks(x):
            if l == 0:
                self.mean.copy_(blk[..., 0].mean(0))
                blk = blk - self.mean[:, None]
            cov = torch.einsum("nsm,ntm->st", blk, blk) / (blk.shape[0] * blk.shape[-1])
            cov = cov + self.ridge * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
            getattr(self, f"precision_{l}").copy_(torch.linalg.inv(cov))
        self.fitted.fill_(1.0)
        return self

    def energy(self, a: torch.Tensor) -> torch.Tensor:
        """``E(a)`` of the module docstring for ``(..., count)`` coefficients -> ``(...)``."""
        total = a.new_zeros(a.shape[:-1])
        for l, blk in self._blocks(a):
            if l == 0:
                blk = blk - self.mean.to(a.dtype)[:, None]
            precision = getattr(self, f"precision_{l}").to(a.dtype)
            total = total + torch.einsum("...sm,st,...tm->...", blk, precision, blk)
        return total / self.count
