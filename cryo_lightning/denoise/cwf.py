"""Covariance Wiener filter (CWF, "Cov2D") of Bhamre, Zhang & Singer (2016).

Model, per image ``i`` of a set, in the steerable Fourier-Bessel basis of
:mod:`cryo_lightning.physics.steerable_basis` (complex coefficients, one block per angular
frequency ``k``)::

    y_i = H_i x_i + n_i,    E[x_i] = mu (k = 0 only),    Cov[x_i] = C = diag_k(C_k),    Cov[n_i] = sigma^2 I.

``x_i`` are the coefficients of the projection (no CTF), ``H_i`` the block-diagonal operator of the
image's CTF and ``sigma^2`` the (known) per-pixel noise variance. Projections of a molecule over
uniformly distributed viewing directions *and in-plane rotations* have a rotationally invariant
distribution, hence the mean only in ``k = 0`` and the block-diagonal covariance (Hermitian blocks
for ``k >= 1``). By default the statistics are also made invariant to mirroring the images, as
ASPIRE does (``do_refl``): the blocks become real symmetric. A chiral molecule's projections are
not mirror invariant, but the imaginary parts are small and estimating them costs more than it
gains (measured at L = 64: relative MSE lower in every setting tried, by about 1% at N = 5000 and
5-20% at N = 16-128). Per set and per block:

1. Mean: least squares ``mu = (sum_i A_i)^-1 sum_i H_i y_i`` with ``A_i = H_i^T H_i``.
2. Covariance: the normal equations of ``min_C sum_i ||r_i r_i^H - H_i C H_i^T - sigma^2 I||_F^2``
   (``r_i = y_i - H_i mu``)::

       sum_i A_i C A_i = sum_i H_i r_i r_i^H H_i - sigma^2 sum_i A_i.

   As in ASPIRE's ``RotCov2D`` (``shrinker="frobenius_norm"``), the right-hand side is whitened
   by ``S = (mean_i A_i)^{1/2}``, its eigenvalues are shrunk with the Frobenius-optimal
   spiked-covariance shrinker of Donoho, Gavish & Johnstone (aspect ratio ``Q_k / N``; this also
   removes the noise term), and it is un-whitened. The equations are solved by preconditioned
   conjugate gradients (preconditioner ``X -> M^-1 X M^-1``, ``M = mean_i A_i``; a few iterations
   suffice; without CTF the solution is the shrunk second moment itself). With more than ``max_ctf_groups`` images, images are grouped by k-means on their
   radial CTF profiles and ``A_i`` is replaced by its group mean in the left-hand side only (the
   error is second order in the spread within a group; Bhamre et al. use defocus groups likewise).
   The solution is made positive semidefinite by clipping negative eigenvalues.
3. Wiener filter per image: ``x_hat_i = mu + C H_i^T (H_i C H_i^T + sigma^2 I)^-1 (y_i - H_i mu)``
   (computed in the range of ``C``, whose rank is small after shrinkage).

The denoised image is the CTF applied to the estimated projection: ``ifft2c(ctf * fft2c(p_hat))``
with the image's full 2D CTF, where ``p_hat`` is evaluated from ``x_hat`` on the pixel grid and is
0 outside the inscribed disk (the CTF spreads it slightly beyond). The CTF enters the statistics
through its angular average (the exact block-diagonal part of the CTF operator; astigmatism's
coupling of ``k`` and ``k +- 2`` is neglected). Relative MSE is computed over the whole image,
so the signal outside the disk that the basis cannot represent counts as error.

Population prior (optional): at small ``N`` the per-set covariance is the weak point (at L = 32,
SNR 1/32, N = 128, CWF with the covariance of 4,096 clean projections of the same molecule has
relative MSE 0.35 instead of 0.44). A :class:`PopulationPrior` holds the mean and covariance of the
projections of each molecule of a population (e.g. the training molecules of a learned denoiser),
each normalised to unit signal power. A set's statistics are blended with a mixture of them::

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

from cryo_lightning.physics.fourier import fft2c, ifft2c
from cryo_lightning.physics.steerable_basis import FourierBesselBasis, fourier_bessel_basis

__all__ = [
    "PopulationPrior",
    "shrink_eigenvalues",
    "ctf_groups",
    "estimate_block_moments",
    "wiener_block",
    "cwf_coefficients",
    "cwf_denoise",
]


@dataclass
class PopulationPrior:
    """Mean and covariance of the projections of each molecule of a population, per unit power.

    Attributes:
        means: ``(M, Q_0)`` float64, each molecule's ``k = 0`` mean over the square root of its
            power ``|mu|^2 + sum_k tr C_k``.
        covariances: per angular frequency ``k``, ``(M, Q_k, Q_k)`` float64 real symmetric PSD
            (mirror-invariant, as :func:`estimate_block_moments` makes them), over the power.
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
            max_ctf_groups: see :func:`ctf_groups`.
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
            power = _signal_power(moments)
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


def _signal_power(moments: list[tuple[torch.Tensor | None, torch.Tensor]]) -> torch.Tensor:
    """``|mu|^2 + sum_k tr C_k`` per set, ``(B,)``, from per-block (mean, covariance) estimates."""
    power = moments[0][0].abs().square().sum(-1)
    for _, C in moments:
        power = power + torch.diagonal(C, dim1=-2, dim2=-1).real.sum(-1)
    return power


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


def ctf_groups(profiles: torch.Tensor, max_groups: int, iterations: int = 10) -> tuple[torch.Tensor, int]:
    """Group the images of each set by their radial CTF profiles (deterministic k-means).

    Args:
        profiles: ``(B, N, n_bins)`` angular averages of the CTFs.
        max_groups: groups per set; with ``N <= max_groups`` every image is its own group.
        iterations: Lloyd iterations after farthest-point initialisation.
    Returns:
        labels ``(B, N)`` int64 in ``[0, G)`` and ``G``.
    """
    B, N, _ = profiles.shape
    if N <= max_groups:
        return torch.arange(N, device=profiles.device).expand(B, N).contiguous(), N
    # A_i = H_i^2 does not depend on the CTF's sign, so cluster the squared profiles.
    f = profiles.square()
    idx = torch.zeros(B, max_groups, dtype=torch.int64, device=f.device)
    dist = (f - f[:, :1]).square().sum(-1)
    for g in range(1, max_groups):
        idx[:, g] = dist.argmax(-1)
        new = torch.gather(f, 1, idx[:, g, None, None].expand(B, 1, f.shape[-1]))
        dist = torch.minimum(dist, (f - new).square().sum(-1))
    centres = torch.gather(f, 1, idx[:, :, None].expand(B, max_groups, f.shape[-1]))
    for _ in range(iterations):
        labels = torch.cdist(f, centres).argmin(-1)
        onehot = torch.nn.functional.one_hot(labels, max_groups).to(f.dtype)  # (B, N, G)
        counts = onehot.sum(1)
        sums = onehot.transpose(1, 2) @ f
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centres)
    return torch.cdist(f, centres).argmin(-1), max_groups


def _hermitian(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.transpose(-1, -2).conj())


def _rmatmul(H: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``H @ z`` for real ``H (..., Q, Q)`` and complex ``z (..., Q, m)``, in real arithmetic."""
    zr = torch.view_as_real(z.contiguous())  # (..., Q, m, 2)
    out = H @ zr.flatten(-2)
    return torch.view_as_complex(out.unflatten(-1, (z.shape[-1], 2)).contiguous())


def _solve_normal_equations(
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
        groups: ``(labels (B, N), G)`` from :func:`ctf_groups` for the covariance's left-hand
            side (default: every image its own group).
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
        b = _hermitian(y.transpose(1, 2) @ y.conj() / N)
        M_evals = torch.ones(B, Q, dtype=torch.float64, device=y.device)
        M_evecs = eye.expand(B, Q, Q)
    else:
        H = H.to(torch.float64)
        A = H @ H
        M = A.mean(1)
        if with_mean:
            rhs = _rmatmul(H, y[..., None]).squeeze(-1).mean(1)
            ridge = 1e-10 * M.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye
            mean = torch.linalg.solve((M + ridge).to(torch.complex128), rhs)
            y = y - _rmatmul(H, mean[:, None, :, None].expand(B, N, Q, 1)).squeeze(-1)
        z = _rmatmul(H, y[..., None]).squeeze(-1)
        b = _hermitian(z.transpose(1, 2) @ z.conj() / N)
        M_evals, M_evecs = torch.linalg.eigh(_hermitian(M))
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
    evals, evecs = torch.linalg.eigh(_hermitian(bw))
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
        C = _solve_normal_equations(A_groups, counts / N, b, M_inv)

    evals, evecs = torch.linalg.eigh(_hermitian(C))
    C = (evecs * evals.clamp_min(0)[:, None, :].to(torch.complex128)) @ evecs.transpose(1, 2).conj()
    return mean, C


def wiener_block(
    y: torch.Tensor,
    covariance: torch.Tensor,
    noise_variance: torch.Tensor,
    H: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Wiener (linear MMSE) estimate of the projections' coefficients in one block.

    ``x_hat = mu + C H^T (H C H^T + sigma^2 I)^-1 (y - H mu)``, evaluated as
    ``mu + V (V^H A V + sigma^2 I)^-1 V^H H^T (y - H mu)`` with ``C = V V^H`` restricted to its
    range (at most the largest rank in the batch).

    Args:
        y: ``(B, N, Q)`` complex.
        covariance: ``(B, Q, Q)`` complex Hermitian PSD.
        noise_variance: ``(B,)``.
        H: ``(B, N, Q, Q)`` real, or None (no CTF).
        mean: ``(B, Q)`` complex, or None (0).
    Returns:
        ``(B, N, Q)`` complex128.
    """
    B, N, Q = y.shape
    y = y.to(torch.complex128)
    s2 = noise_variance.to(torch.float64).reshape(B)
    H = H.to(torch.float64) if H is not None else None
    if mean is not None:
        y = y - (mean[:, None] if H is None else _rmatmul(H, mean[:, None, :, None].expand(B, N, Q, 1)).squeeze(-1))
    evals, evecs = torch.linalg.eigh(_hermitian(covariance.to(torch.complex128)))
    rank = int((evals > 1e-12 * evals[:, -1:].clamp_min(1e-300)).sum(-1).max()) if Q else 0
    if rank == 0:
        x = torch.zeros_like(y)
    elif H is None:
        gain = (evals / (evals + s2[:, None])).to(torch.complex128)
        x = ((y @ evecs.conj()) * gain[:, None, :]) @ evecs.transpose(1, 2)
    else:
        V = evecs[..., -rank:] * evals[:, None, -rank:].clamp_min(0).sqrt().to(torch.complex128)  # (B, Q, r)
        HV = _rmatmul(H, V[:, None].expand(B, N, Q, rank))  # (B, N, Q, r)
        eye = torch.eye(rank, dtype=torch.complex128, device=y.device)
        K = HV.transpose(-1, -2).conj() @ HV + s2[:, None, None, None] * eye
        rhs = HV.transpose(-1, -2).conj() @ y[..., None]
        x = (V[:, None] @ torch.linalg.solve(K, rhs)).squeeze(-1)
    return x if mean is None else x + mean[:, None]


def cwf_coefficients(
    coeffs: torch.Tensor,
    basis: FourierBesselBasis,
    noise_variance: torch.Tensor,
    ctf_profiles: torch.Tensor | None = None,
    *,
    shrinkage: bool = True,
    reflection_invariant: bool = True,
    max_ctf_groups: int = 64,
    prior: PopulationPrior | None = None,
    prior_strength: float = 0.0,
    prior_tempering: float = 0.0,
) -> torch.Tensor:
    """CWF estimate of the projections' basis coefficients, statistics estimated per set.

    Args:
        coeffs: ``(B, N, count)`` complex coefficients of the noisy images.
        basis: the basis of ``coeffs``.
        noise_variance: ``(B,)`` per-pixel noise variance.
        ctf_profiles: ``(B, N, n_bins)`` from :meth:`FourierBesselBasis.radial_profile`, or None.
        shrinkage, reflection_invariant, max_ctf_groups: see :func:`estimate_block_moments` and
            :func:`ctf_groups`.
        prior, prior_strength, prior_tempering: a population prior, its strength ``nu`` in images
            and the tempering ``beta`` of its molecule weights (module docstring); None or
            ``nu = 0``: the set's own statistics only.
    Returns:
        ``(B, N, count)`` complex128 coefficients of the estimated projections (no CTF).
    """
    groups = None if ctf_profiles is None else ctf_groups(ctf_profiles, max_ctf_groups)
    blocks = basis.split(coeffs)
    operators = [None if ctf_profiles is None else basis.radial_operator(ctf_profiles, k) for k in range(len(blocks))]
    moments = [
        estimate_block_moments(y, noise_variance, H, with_mean=k == 0, shrinkage=shrinkage,
                               reflection_invariant=reflection_invariant, groups=groups)
        for k, (y, H) in enumerate(zip(blocks, operators))
    ]
    if prior is not None and prior_strength > 0:
        moments = _blend_with_prior(moments, blocks, operators, noise_variance, prior, prior_strength,
                                    prior_tempering)
    return torch.cat([wiener_block(y, C, noise_variance, H, mean)
                      for y, H, (mean, C) in zip(blocks, operators, moments)], dim=-1)


def _blend_with_prior(
    moments: list[tuple[torch.Tensor | None, torch.Tensor]], blocks: list[torch.Tensor],
    operators: list[torch.Tensor | None], noise_variance: torch.Tensor, prior: PopulationPrior, strength: float,
    tempering: float,
) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """The per-set moments blended with the prior's molecules, scaled to each set's power (module docstring)."""
    B, N = blocks[0].shape[:2]
    power = _signal_power(moments)
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


@torch.no_grad()
def cwf_denoise(
    noisy: torch.Tensor,
    ctf: torch.Tensor | None,
    noise_variance: torch.Tensor | float,
    *,
    shrinkage: bool = True,
    reflection_invariant: bool = True,
    max_ctf_groups: int = 64,
    basis: FourierBesselBasis | None = None,
    prior: PopulationPrior | None = None,
    prior_strength: float = 0.0,
    prior_tempering: float = 0.0,
) -> torch.Tensor:
    """Covariance Wiener filter of every image, with mean and covariance estimated from its set.

    Args:
        noisy: ``(B, N, L, L)`` real images of ``B`` sets (centred particles).
        ctf: ``(B, N, L, L)`` centred-layout CTF of each image (RELION sign), or None / all ones
            for no CTF.
        noise_variance: ``(B,)`` (or a scalar) per-pixel noise variance, in image units squared.
        shrinkage: shrink the covariance's eigenvalues (ASPIRE's default); False subtracts the
            noise term and clips.
        reflection_invariant: impose the mirror symmetry of the statistics (ASPIRE's default;
            fewer parameters, lower error for small sets) instead of a Hermitian covariance.
        max_ctf_groups: CTF groups for the covariance's least-squares operator (exact for
            ``N <= max_ctf_groups``).
        basis: a :class:`FourierBesselBasis` for ``L`` (default: the cached one for the input's
            device).
        prior, prior_strength, prior_tempering: see :func:`cwf_coefficients`.
    Returns:
        ``(B, N, L, L)`` estimates of the clean CTF-affected images, dtype and device of ``noisy``.
    """
    B, N, L, _ = noisy.shape
    if basis is None:
        basis = fourier_bessel_basis(L, noisy.device, torch.float64 if noisy.dtype == torch.float64 else torch.float32)
    s2 = torch.as_tensor(noise_variance, dtype=torch.float64, device=noisy.device).expand(B)
    with_ctf = ctf is not None and not bool((ctf == 1).all())
    profiles = basis.radial_profile(ctf) if with_ctf else None
    x = cwf_coefficients(
        basis.expand(noisy), basis, s2, profiles, shrinkage=shrinkage,
        reflection_invariant=reflection_invariant, max_ctf_groups=max_ctf_groups,
        prior=prior, prior_strength=prior_strength, prior_tempering=prior_tempering,
    )
    images = basis.evaluate(x.to(torch.complex64 if basis.dtype == torch.float32 else torch.complex128))
    if with_ctf:
        images = ifft2c(fft2c(images) * ctf.to(images.dtype)).real
    return images.to(noisy.dtype)
