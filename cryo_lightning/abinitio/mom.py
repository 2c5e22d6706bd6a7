"""Classical method-of-moments reconstruction: weighted non-convex least squares on ``(M1, M2)``.

Unknowns: the volume's SFB coefficients ``a`` and the viewing distribution's even-degree
coefficients ``b`` (``b_00 = 1`` fixed, so only ``b_lm, l >= 2`` are free). Loss (per CTF group
``g`` with image fraction ``w_g``; norms Frobenius over all blocks)::

    L(a, b) = sum_g w_g ||M1_g(a, b) - M1hat_g||^2 / ||M1hat||^2
            + sum_g w_g ||M2_g(a, b) - M2hat_g||^2 / ||M2hat||^2
            + mu * mean_j relu(-rho(u_j))^2                     (rho >= 0 on a sphere grid)

with ``||M||^2 = sum_g w_g ||M_g||^2``. Stages (DESIGN section 4.5): ``M1`` alone, then ``M1 +
M2``, each by L-BFGS (strong Wolfe line search) in float64, from several random starts; the
start with the lowest final loss wins. The moments are invariant under a joint rotation of
``(a, b)`` and under the mirror ``(a, b) -> (reflect(a), reflect(b))``, so the answer is
determined only up to O(3): compare with a reference through
:func:`~cryo_lightning.abinitio.volume_alignment.align_volumes`.

Starts. ``b`` from :meth:`SHViewingDistribution.random`; ``a`` white Gaussian (the molecule's
power spectrum is unknown), scaled so that ``tr M2(a0, b0)`` equals the target's (``M2`` is
quadratic in ``a``).

Identifiability (measured, benchmarks/moments.py). For in-plane-uniform, even viewing
distributions the Jacobian of ``(M1, M2)`` at the truth has more null directions than the 3 of a
global rotation (e.g. 8 for ``l_max = 1``: ``M2`` of the odd part is ``A G(b) A^T``, invariant
under ``A -> A X``, ``G -> X^-1 G X^-T``), in the ideal steerable model and, to 1e-10, on the
pixel grid. Fits therefore reach moment residuals near zero at volumes that differ from the
truth by more than O(3); a prior or the third moment is needed to pin them down.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from cryo_lightning.abinitio.moment_model import MomentModel
from cryo_lightning.abinitio.moments import ImageMoments, MomentLayout, estimate_moments
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.spherical_harmonics import sphere_quadrature
from cryo_lightning.physics.viewing_sh import SHViewingDistribution

__all__ = ["moment_loss", "MomResult", "fit_moments", "moments_reconstruct"]


def _sq(x: torch.Tensor) -> torch.Tensor:
    return (x.real * x.real + x.imag * x.imag).sum(dim=tuple(range(1, x.ndim)))


def moment_loss(
    model: MomentModel,
    a: torch.Tensor,
    b: torch.Tensor,
    target: ImageMoments,
    use_m2: bool = True,
    m2_weight: float = 1.0,
) -> torch.Tensor:
    """Relative moment misfit ``L(a, b)`` of the module docstring, without the positivity term.

    Args:
        model: forward model whose CTF groups match ``target``'s.
        a: ``(count,)`` SFB coefficients.
        b: ``(b_count,)`` viewing coefficients, ``b_00`` included.
        target: empirical (or exact) moments.
        use_m2: include the ``M2`` term.
        m2_weight: factor on the ``M2`` term.
    Returns:
        scalar, differentiable in ``a`` and ``b``.
    """
    w = target.weights.to(a.device, a.dtype)
    m1, m2 = model(a, b)
    loss = (w * _sq(m1 - target.m1)).sum() / (w * _sq(target.m1)).sum().clamp_min(1e-300)
    if use_m2:
        num = sum((w * _sq(mk - tk)).sum() for mk, tk in zip(m2, target.m2))
        den = sum((w * _sq(tk)).sum() for tk in target.m2)
        loss = loss + m2_weight * num / den.clamp_min(1e-300)
    return loss


@dataclass
class MomResult:
    """Outcome of :func:`fit_moments`.

    Attributes:
        coeffs: ``(count,)`` float64 SFB coefficients of the best start.
        view_coeffs: ``(b_count,)`` float64, ``b_00 = 1``.
        view_degree: ``2h``.
        loss: final loss of the best start.
        losses: final loss of every start.
        seconds: wall time of the whole fit.
        evaluations: loss evaluations summed over starts and stages.
    """

    coeffs: torch.Tensor
    view_coeffs: torch.Tensor
    view_degree: int
    loss: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    evaluations: int = 0

    @property
    def distribution(self) -> SHViewingDistribution:
        """The fitted viewing distribution (not forced non-negative)."""
        return SHViewingDistribution(self.view_coeffs.detach().cpu(), self.view_degree)


def _lbfgs(params: list[torch.Tensor], closure, max_iter: int) -> int:
    """Run L-BFGS until ``max_iter`` iterations or convergence; return the number of evaluations."""
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.5),
                            tolerance_grad=1e-12, tolerance_change=1e-15, history_size=50,
                            line_search_fn="strong_wolfe")
    count = [0]

    def counted():
        count[0] += 1
        return closure()

    opt.step(counted)
    return count[0]


def fit_moments(
    model: MomentModel,
    target: ImageMoments,
    n_starts: int = 4,
    iterations: tuple[int, int] = (100, 500),
    positivity_weight: float = 10.0,
    m2_weight: float = 1.0,
    generator: torch.Generator | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    verbose: bool = False,
) -> MomResult:
    """Fit ``(a, b)`` to moments: staged L-BFGS from several random starts (module docstring).

    Args:
        model: forward model (its CTF groups match the target's).
        target: moments (see :func:`~cryo_lightning.abinitio.moments.estimate_moments`).
        n_starts: random starts.
        iterations: L-BFGS iterations of the ``M1`` stage and of the ``M1 + M2`` stage.
        positivity_weight: ``mu``, weight of the penalty on negative ``rho``.
        m2_weight: factor on the ``M2`` term.
        generator: seeds the starts (CPU).
        init: optional ``(a0, b0)`` used as the first start (``b0`` with ``b_00``).
        verbose: print the loss of every start.
    Returns:
        :class:`MomResult` of the best start.
    """
    t0 = time.perf_counter()
    dev = model.device
    target = target.to(dev)
    nodes, _ = sphere_quadrature(2 * model.view_degree + 8, device=dev)
    # rho at a grid for the positivity penalty; linear in b.
    eye = torch.eye(model.b_count, dtype=torch.float64)
    rho_table = torch.stack(
        [SHViewingDistribution(e, model.view_degree).density(nodes.cpu()) for e in eye], dim=-1
    ).to(dev)
    tr_target = sum(float((target.weights.to(dev) * torch.diagonal(t, dim1=-2, dim2=-1).real.sum(-1)).sum())
                    for t in target.m2)

    best: MomResult | None = None
    losses, evaluations = [], 0
    for start in range(n_starts):
        if start == 0 and init is not None:
            a = init[0].to(dev, torch.float64).clone()
            b_rest = init[1].to(dev, torch.float64)[1:].clone()
        else:
            b_rest = SHViewingDistribution.random(model.view_degree, generator=generator).coeffs[1:].to(dev)
            a = torch.randn(model.basis.layout.count, generator=generator, dtype=torch.float64).to(dev)
            with torch.no_grad():
                _, m2 = model(a, torch.cat([b_rest.new_ones(1), b_rest]))
                tr = sum(float((target.weights.to(dev) * torch.diagonal(t, dim1=-2, dim2=-1).real.sum(-1)).sum())
                         for t in m2)
            a = a * math.sqrt(max(tr_target, 1e-300) / max(tr, 1e-300))
        a.requires_grad_(True)
        b_rest.requires_grad_(True)

        def full_b() -> torch.Tensor:
            return torch.cat([b_rest.new_ones(1), b_rest])

        for stage, n_iter in enumerate(iterations):
            if n_iter <= 0:
                continue
            use_m2 = stage == 1

            def closure() -> torch.Tensor:
                if torch.is_grad_enabled():
                    a.grad, b_rest.grad = None, None
                b = full_b()
                loss = moment_loss(model, a, b, target, use_m2=use_m2, m2_weight=m2_weight)
                neg = torch.relu(-(rho_table @ b))
                loss = loss + positivity_weight * (neg * neg).mean()
                if loss.requires_grad:
                    loss.backward()
                return loss

            evaluations += _lbfgs([a, b_rest], closure, n_iter)
        with torch.no_grad():
            final = float(moment_loss(model, a, full_b(), target, m2_weight=m2_weight))
        losses.append(final)
        if verbose:
            print(f"start {start}: loss {final:.3e}")
        if best is None or final < best.loss:
            best = MomResult(a.detach().clone(), full_b().detach().clone(), model.view_degree, final)
    assert best is not None
    best.losses, best.seconds, best.evaluations = losses, time.perf_counter() - t0, evaluations
    return best


def moments_reconstruct(
    images: torch.Tensor,
    noise_variance: float | torch.Tensor,
    ctfs: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    l_max: int = 6,
    bandlimit: float = 0.25,
    view_degree: int = 4,
    n_starts: int = 4,
    iterations: tuple[int, int] = (100, 500),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, SHViewingDistribution, torch.Tensor, MomResult]:
    """Ab initio map from particle images by the method of moments (for ``cryol reconstruct``).

    Args:
        images: ``(N, L, L)`` particles, centred, in-plane rotations assumed uniform.
        noise_variance: ``sigma^2`` (scalar or ``(N,)``), e.g. from
            :func:`~cryo_lightning.physics.noise.estimate_noise_variance`.
        ctfs: ``(G, L, L)`` centred CTFs of the groups (``None``: no CTF).
        groups: ``(N,)`` group of each image (required with ``ctfs`` when ``G > 1``).
        l_max: SFB degree of the volume.
        bandlimit: volume and image band limit, cycles/pixel.
        view_degree: ``2h`` of the viewing distribution.
        n_starts, iterations, generator: as in :func:`fit_moments`.
        device: where to compute.
    Returns:
        ``(coeffs (count,), distribution, volume (L, L, L) float32, result)``; the map's
        orientation and hand are arbitrary.
    """
    L = images.shape[-1]
    layout = MomentLayout(L, l_max, bandlimit=bandlimit, device=device)
    basis = SphericalFourierBesselBasis(L, l_max=l_max, bandlimit=bandlimit, device=device)
    n_groups = 1 if ctfs is None else ctfs.shape[0]
    if n_groups > 1 and groups is None:
        raise ValueError("groups are required with more than one CTF")
    target = estimate_moments(images, layout, groups=groups, noise_variance=noise_variance, n_groups=n_groups)
    model = MomentModel(basis, layout, view_degree, ctfs=ctfs)
    result = fit_moments(model, target, n_starts=n_starts, iterations=iterations, generator=generator)
    volume = basis.evaluate(result.coeffs).to(torch.float32)
    return result.coeffs, result.distribution, volume, result
