"""Population prior of the covariance Wiener filter: per-molecule projection statistics to blend a set's with.

At small ``N`` the per-set covariance is the weak point of the CWF (:mod:`cryo_lightning.denoise.cwf`;
at L = 32, SNR 1/32, N = 128, CWF with the covariance of 4,096 clean projections of the same molecule
has relative MSE 0.35 instead of 0.44). A :class:`PopulationPrior` holds the mean and covariance of the
projections of each molecule of a population (e.g. the training molecules of a learned denoiser),
each normalised to unit signal power. A set's statistics are blended with a mixture of them
(:func:`blend_with_prior`)::

    C_k <- (N C_k + nu P C0_k) / (N + nu),    mu <- (N mu + nu sqrt(P) mu0) / (N + nu),
    C0_k = sum_m w_m C_k^(m),  mu0 = sum_m w_m mu^(m),  w_m ∝ p(set | molecule m)^beta,

with ``P = |mu|^2 + sum_k tr C_k`` the set's estimated signal power (coefficient units), so each
molecule's statistics are scaled to the set's power; ``p(set | m)`` is the Gaussian likelihood of
the set's coefficients, ``y_i ~ N(H_i sqrt(P) mu^(m), P H_i C^(m) H_i^T + sigma^2 I)``. The
tempering ``beta`` in [0, 1] (0: the population average; 1: the Bayes posterior over the
population) keeps the weights from collapsing onto one molecule, since a new molecule is none of
them. ``nu`` (in images) is the prior's strength; ``nu = 0`` is the classical CWF.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from cryo_lightning.denoise.block_moments import estimate_block_moments, signal_power
from cryo_lightning.denoise.ctf_groups import ctf_groups
from cryo_lightning.physics.steerable_basis import FourierBesselBasis

__all__ = ["PopulationPrior", "blend_with_prior"]


@dataclass
class PopulationPrior:
    """Mean and covariance of the projections of each molecule of a population, per unit power.

    Attributes:
        means: ``(M, Q_0)`` float64, each molecule's ``k = 0`` mean over the square root of its
            power ``|mu|^2 + sum_k tr C_k``.
        covariances: per angular frequency ``k``, ``(M, Q_k, Q_k)`` float64 real symmetric PSD
            (mirror-invariant, as
            :func:`~cryo_lightning.denoise.block_moments.estimate_block_moments` makes them), over
            the power.
    """

    means: torch.Tensor
    covariances: list[torch.Tensor]

    def __len__(self) -> int:
        return self.means.shape[0]

    @classmethod
    def fit(
        cls, molecules: Iterable[tuple[torch.Tensor, torch.Tensor | None]], basis: FourierBesselBasis,
        max_ctf_groups: int = 64,
    ) -> "PopulationPrior":
        """Statistics of each molecule from clean (noise-free) images of it at uniform poses.

        The images may carry a CTF: the moments are then estimated through it by the same least
        squares as a set's (every defocus fills in the others' zeros).

        Args:
            molecules: per molecule, ``(n, L, L)`` clean images and their ``(n, L, L)`` centred
                CTFs, or None (CTF-free projections).
            basis: the steerable basis for ``L``.
            max_ctf_groups: see :func:`~cryo_lightning.denoise.ctf_groups.ctf_groups`.
        """
        means, covariances = [], []
        for m, (images, ctf) in enumerate(molecules):
            coeffs = basis.expand(images)[None]
            profiles = None if ctf is None else basis.radial_profile(ctf)[None]
            groups = None if profiles is None else ctf_groups(profiles, max_ctf_groups)
            zero = torch.zeros(1, dtype=torch.float64, device=coeffs.device)
            moments = [
                estimate_block_moments(y, zero, None if profiles is None else basis.radial_operator(profiles, k),
                                       with_mean=k == 0, shrinkage=False, groups=groups)
                for k, y in enumerate(basis.split(coeffs))
            ]
            power = signal_power(moments)
            if not bool(power > 0):
                raise ValueError(f"PopulationPrior.fit: molecule {m} has no signal (all-zero images)")
            means.append(moments[0][0][0].real / power.sqrt())
            covariances.append([C[0].real / power for _, C in moments])
        if not means:
            raise ValueError("PopulationPrior.fit: no molecules given")
        return cls(torch.stack(means), [torch.stack(c) for c in zip(*covariances)])

    def log_likelihoods(
        self, blocks: list[torch.Tensor], operators: list[torch.Tensor | None], noise_variance: torch.Tensor,
        power: torch.Tensor,
    ) -> torch.Tensor:
        """Gaussian log-likelihood of each set's coefficients under each molecule (module docstring).

        Args:
            blocks: per ``k``, ``(B, N, Q_k)`` complex coefficients.
            operators: per ``k``, ``(B, N, Q_k, Q_k)`` CTF operators or None.
            noise_variance: ``(B,)``.
            power: ``(B,)`` the sets' signal power.
        Returns:
            ``(B, M)`` float64, up to a constant per set.
        """
        s2 = noise_variance.to(torch.float64)[:, None, None, None, None]
        scale = power.to(torch.float64)[:, None, None, None, None]
        out = 0.0
        for k, (y, H) in enumerate(zip(blocks, operators)):
            B, N, Q = y.shape
            C = self.covariances[k].to(y.device)[None, :, None]  # (1, M, 1, Q, Q)
            HCH = C if H is None else H.to(torch.float64)[:, None] @ C @ H.to(torch.float64)[:, None]
            cov = scale * HCH + s2 * torch.eye(Q, dtype=torch.float64, device=y.device)  # (B, M, N, Q, Q)
            r = y.to(torch.complex128)[:, None].expand(B, len(self), N, Q)
            if k == 0:
                mu = self.means.to(y.device)[None, :, None, :, None] * scale.sqrt()
                r = r - (mu if H is None else H.to(torch.float64)[:, None] @ mu).squeeze(-1)
            chol = torch.linalg.cholesky(cov)
            logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (B, M, N)
            parts = torch.stack([r.real, r.imag], -1) if k > 0 else r.real[..., None]
            z = torch.linalg.solve_triangular(chol, parts, upper=False)
            if k == 0:  # real Gaussian
                out = out - 0.5 * (z.square().sum((-1, -2)) + logdet).sum(-1)
            else:  # circular complex Gaussian, E[y y^H] = cov
                out = out - (z.square().sum((-1, -2)) + logdet).sum(-1)
        return out

    @staticmethod
    def flat_size(basis: FourierBesselBasis) -> int:
        """Values per molecule in :meth:`flatten` for ``basis``."""
        return basis.block_sizes[0] + sum(q * q for q in basis.block_sizes)

    def flatten(self) -> torch.Tensor:
        """``(M, flat_size)`` float64 (for a module buffer)."""
        M = len(self)
        return torch.cat([self.means] + [c.reshape(M, -1) for c in self.covariances], dim=1)

    @classmethod
    def unflatten(cls, flat: torch.Tensor, basis: FourierBesselBasis) -> "PopulationPrior":
        """Inverse of :meth:`flatten`."""
        if flat.ndim != 2 or flat.shape[1] != cls.flat_size(basis):
            raise ValueError(f"a population prior for L = {basis.L} is (molecules, {cls.flat_size(basis)}), "
                             f"got {tuple(flat.shape)}")
        sizes = basis.block_sizes
        parts = torch.split(flat.to(torch.float64), [sizes[0]] + [q * q for q in sizes], dim=1)
        return cls(parts[0], [p.reshape(-1, q, q) for p, q in zip(parts[1:], sizes)])

def blend_with_prior(
    moments: list[tuple[torch.Tensor | None, torch.Tensor]], blocks: list[torch.Tensor],
    operators: list[torch.Tensor | None], noise_variance: torch.Tensor, prior: PopulationPrior, strength: float,
    tempering: float,
) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """The per-set moments blended with the prior's molecules, scaled to each set's power (module docstring).

    Args:
        moments: per ``k``, the set's (mean or None, covariance) from
            :func:`~cryo_lightning.denoise.block_moments.estimate_block_moments`.
        blocks, operators, noise_variance: as for :meth:`PopulationPrior.log_likelihoods`.
        prior: the population.
        strength: ``nu``, in images.
        tempering: ``beta`` of the molecule weights (0: the population average).
    Returns:
        per ``k``, the blended (mean or None, covariance).
    """
    B, N = blocks[0].shape[:2]
    power = signal_power(moments)
    if tempering > 0 and len(prior) > 1:
        loglik = prior.log_likelihoods(blocks, operators, noise_variance, power)
        w = torch.softmax(tempering * loglik, dim=-1)
    else:
        w = torch.full((B, len(prior)), 1 / len(prior), dtype=torch.float64, device=power.device)
    a = strength / (N + strength)
    out = []
    for k, (mean, C) in enumerate(moments):
        C0 = torch.einsum("bm,mpq->bpq", w, prior.covariances[k].to(C.device)) * power[:, None, None]
        blended = (1 - a) * C + a * C0.to(C.dtype)
        if mean is not None:
            mean = (1 - a) * mean + a * ((w @ prior.means.to(mean.device)) * power[:, None].sqrt()).to(mean.dtype)
        out.append((mean, blended))
    return out
