"""Classical method-of-moments solver: weighted non-convex least squares on ``(M1, M2, M3)``.

Unknowns: the volume's SFB coefficients ``a`` and the viewing distribution's even-degree
coefficients ``b`` (``b_00 = 1`` fixed). The loss ``L(a, b)``, relative moment misfit plus a
positivity penalty on the viewing density, is that of :mod:`~cryo_lightning.abinitio.moment_loss`.
Stages (DESIGN section 4.5; the subspace method of moments marches the same way): ``M1`` alone,
then ``M1 + M2``, then ``M1 + M2 + M3``, and optionally a last stage on whitened moments (every
index scaled by ``1 / sqrt(E|c_i|^2)``,
:func:`~cryo_lightning.abinitio.moment_loss.whitening_scales`, so that high radial
frequencies count), each by L-BFGS (strong Wolfe line search) in float64, from several random
starts; the start with the lowest final loss wins. The moments are invariant under a joint rotation of
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
pixel grid. More generally, in-plane-invariant ``M2`` has about ``(l_max + 1) S^2 / 2`` entries
for ``S (l_max + 1)^2`` volume unknowns (``S`` radial functions), and even where the count
suffices the Jacobian has dozens of singular values below 1e-8: fits reach moment residuals near
zero at volumes far from the truth. The third-moment slice removes every null direction except
the 3 rotations (benchmarks/moments.py); the remaining difficulty is non-convexity.

Block basin hopping (``hops > 0``). From random starts at ``L = 32`` and ``l_max >= 3`` the staged
fit ends in local minima (benchmarks/moments_landscape.py) whose error sits in a few degrees:
typically the odd degrees, whose Gram matrices ``a_l a_l^T`` are off, and single degrees with the
right Gram matrix but the wrong ``O(2l + 1)`` factor. The moments split by parity (the odd
angular-frequency blocks of ``M2`` and of the ``M3`` slice are quadratic in the odd-degree
coefficients; ``M1`` and the even blocks do not see them), so a minimum that is wrong in one such
block is separated from the truth by a barrier along the whole vector but not along the block.
A hop redraws one block (all odd degrees together, then each degree ``l >= 1`` in turn) as white
noise of the block's current norm, refits that block with the rest held, polishes all unknowns,
and keeps the result only if the final-stage loss went down.

Priors (MAP). With noisy moments the minimiser of ``L`` is itself off the truth, along the weakly
determined directions (fits started at the true ``(a, b)`` drift away).
``fit_moments(prior=E, prior_weight=lam)`` minimises ``L + lam E(a)`` instead, ``E`` a negative log prior density (the learned reconstructor's
:class:`~cryo_lightning.models.coefficient_prior.CoefficientPrior`). The data term's noise
scale is :func:`~cryo_lightning.abinitio.moment_loss.expected_misfit`, the value ``L`` takes at
the truth on average, computed from the moments' sampling errors, so ``lam`` is set in its units
and vanishes for exact moments.

Newton polish (``newton > 0``). Near the minimum the loss is badly conditioned (at the truth, from
exact moments at ``L = 16``, ``l_max = 2``: Hessian eigenvalues from about 6e2 down to 2e-5 besides
the 3 of the rotation gauge), so L-BFGS stalls with relative errors of 1e-4 to 4e-3 however long
it runs. A few damped Newton (Levenberg-Marquardt) steps on the exact Hessian of the final loss,
``(H + mu max|diag H| I) s = -g`` with ``mu`` divided by 10 after a step that lowers the loss and
multiplied by 10 otherwise, converge quadratically instead. One Hessian costs about one gradient
per unknown (``count + b_count``; 69 at ``l_max = 2``, a few hundred at ``l_max = 3..6``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from cryo_lightning.abinitio.image_moments import ImageMoments
from cryo_lightning.abinitio.moment_forward_model import MomentModel
from cryo_lightning.abinitio.moment_loss import expected_misfit, moment_loss, whitening_scales
from cryo_lightning.physics.fourier_bessel import SFBLayout
from cryo_lightning.physics.spherical_harmonics import sphere_quadrature
from cryo_lightning.physics.viewing_sh import SHViewingDistribution

__all__ = ["power_matched_start", "uniform_view_start", "MomResult", "hop_blocks", "newton_polish", "fit_moments",
           "map_polish"]


def power_matched_start(model: MomentModel, target: ImageMoments, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` scaled so that the group-weighted ``tr M2(a, b)`` equals the target's (``M2`` is quadratic in ``a``)."""
    w = target.weights.to(a.device)

    def power(m2: list[torch.Tensor]) -> float:
        return sum(float((w * torch.diagonal(t, dim1=-2, dim2=-1).real.sum(-1)).sum()) for t in m2)

    with torch.no_grad():
        now = power(model(a, b)[1])
    return a * math.sqrt(max(power(target.m2), 1e-300) / max(now, 1e-300))


def uniform_view_start(model: MomentModel, target: ImageMoments, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """A rotation-invariant start: white ``a`` (:func:`power_matched_start`), uniform viewing distribution.

    Returns:
        ``a0 (count,)``, ``b0 (b_count,)`` float64 on the CPU, ``b0 = (1, 0, ..., 0)``.
    """
    b0 = torch.zeros(model.b_count, dtype=torch.float64)
    b0[0] = 1.0
    a0 = torch.randn(model.basis.layout.count, generator=generator, dtype=torch.float64)
    return power_matched_start(model, target, a0, b0), b0


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
        hops_accepted: basin hops that lowered the loss.
        hop_losses: loss after every hop (accepted or not).
    """

    coeffs: torch.Tensor
    view_coeffs: torch.Tensor
    view_degree: int
    loss: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    evaluations: int = 0
    hops_accepted: int = 0
    hop_losses: list[float] = field(default_factory=list)

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


def _objective(model, a, b_rest, target, use_m2, use_m3, m2_weight, scales, rho_table, positivity_weight,
               prior=None, prior_weight=0.0) -> torch.Tensor:
    """The minimised loss: moment misfit, weighted prior energy and the positivity penalty on ``rho``."""
    b = torch.cat([b_rest.new_ones(1), b_rest])
    loss = moment_loss(model, a, b, target, use_m2=use_m2, m2_weight=m2_weight, use_m3=use_m3,
                       scales=scales) + _prior_term(prior, prior_weight, a)
    neg = torch.relu(-(rho_table @ b))
    return loss + positivity_weight * (neg * neg).mean()


def _closure(model, a, b_rest, target, use_m2, use_m3, m2_weight, scales, rho_table, positivity_weight,
             prior=None, prior_weight=0.0):
    def closure() -> torch.Tensor:
        if torch.is_grad_enabled():
            a.grad, b_rest.grad = None, None
        loss = _objective(model, a, b_rest, target, use_m2, use_m3, m2_weight, scales, rho_table, positivity_weight,
                          prior, prior_weight)
        if loss.requires_grad:
            loss.backward()
        return loss

    return closure


def _prior_term(prior, weight: float, a: torch.Tensor) -> torch.Tensor | float:
    return weight * prior(a) if prior is not None and weight > 0 else 0.0


def hop_blocks(layout: SFBLayout) -> list[tuple[str, torch.Tensor]]:
    """Coefficient blocks that basin hopping redraws, in order: all odd degrees, then each ``l >= 1``.

    Returns:
        ``(name, mask)`` pairs, ``mask`` ``(count,)`` bool; empty blocks are left out.
    """
    degree = layout.lsm()[:, 0]
    blocks = [("odd", degree % 2 == 1)] if layout.l_max >= 3 else []
    blocks += [(f"l={l}", degree == l) for l in range(1, layout.l_max + 1)]
    return [(name, m) for name, m in blocks if bool(m.any())]


def _basin_hop(model, target, a, b_rest, hops, n_iter, use_m3, scales, rho_table, positivity_weight, m2_weight,
               generator, tol, verbose, progress, prior=None, prior_weight=0.0
               ) -> tuple[torch.Tensor, torch.Tensor, float, int, list[float], int]:
    """Block basin hopping from ``(a, b_rest)`` (module docstring); returns the best state and its loss."""
    blocks = [(name, m.to(a.device)) for name, m in hop_blocks(model.basis.layout)]

    def unpenalised(av: torch.Tensor, bv: torch.Tensor) -> torch.Tensor:  # the reported loss: no positivity term
        return _objective(model, av, bv, target, True, use_m3, m2_weight, scales, rho_table, 0.0, prior, prior_weight)

    def loss_of(av: torch.Tensor, bv: torch.Tensor) -> float:
        with torch.no_grad():
            return float(unpenalised(av, bv))

    best_a, best_b = a.detach().clone(), b_rest.detach().clone()
    best, accepted, history, evaluations = loss_of(best_a, best_b), 0, [], 0
    bar = tqdm(total=hops if blocks else 0, desc="basin hops", unit="hop", disable=not progress, leave=False)
    for hop in range(hops if blocks else 0):
        if best <= tol:
            break
        name, m = blocks[hop % len(blocks)]
        draw = torch.randn(int(m.sum()), generator=generator, dtype=torch.float64).to(a.device)
        x = (draw * best_a[m].norm() / draw.norm().clamp_min(1e-300)).requires_grad_(True)

        def block_closure() -> torch.Tensor:
            if torch.is_grad_enabled():
                x.grad = None
            loss = unpenalised(best_a.masked_scatter(m, x), best_b)  # b held: its penalty is constant
            if loss.requires_grad:
                loss.backward()
            return loss

        evaluations += _lbfgs([x], block_closure, n_iter)
        new_a = best_a.masked_scatter(m, x.detach()).requires_grad_(True)
        new_b = best_b.clone().requires_grad_(True)
        evaluations += _lbfgs([new_a, new_b], _closure(model, new_a, new_b, target, True, use_m3, m2_weight, scales,
                                                       rho_table, positivity_weight, prior, prior_weight), n_iter)
        loss = loss_of(new_a.detach(), new_b.detach())
        history.append(loss)
        if loss < best:
            best, best_a, best_b, accepted = loss, new_a.detach().clone(), new_b.detach().clone(), accepted + 1
        if verbose:
            print(f"hop {hop} ({name}): loss {loss:.3e}, best {best:.3e}")
        bar.set_postfix(best=f"{best:.2e}", accepted=accepted)
        bar.update()
    bar.close()
    return best_a, best_b, best, accepted, history, evaluations


def newton_polish(loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, iterations: int,
                  damping: float = 1e-3) -> tuple[torch.Tensor, float, int]:
    """Damped Newton (Levenberg-Marquardt) steps on a smooth scalar function (module docstring).

    Args:
        loss_of: ``x -> scalar`` float64, twice differentiable by autograd.
        x: ``(n,)`` float64 start.
        iterations: Newton steps at most (each solves one ``n x n`` system after one Hessian).
        damping: initial ``mu``, relative to the Hessian's largest diagonal entry.
    Returns:
        ``(x, loss, evaluations)``: the end point, its loss, and the function evaluations spent
        (a Hessian counted as ``n``).
    """
    x = x.detach().clone()
    loss, mu, evaluations = float(loss_of(x)), float(damping), 1
    start = loss
    eye = torch.eye(x.numel(), dtype=x.dtype, device=x.device)
    for _ in range(iterations):
        if loss <= 1e-24 * start:  # at round-off: nothing left to gain
            break
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_of(xg), xg)
        hessian = torch.autograd.functional.hessian(loss_of, x)
        evaluations += 1 + x.numel()
        scale = float(hessian.diagonal().abs().max().clamp_min(1e-300))
        while mu <= 1e6:
            try:
                step = torch.linalg.solve(hessian + mu * scale * eye, -grad)
            except RuntimeError:  # singular at this damping
                step = None
            trial = float(loss_of(x + step)) if step is not None else math.inf
            evaluations += 1
            if trial < loss:
                x, loss, mu = x + step, trial, max(mu / 10.0, 1e-15)
                break
            mu *= 10.0
        else:  # no damping lowers the loss: a minimum to working precision
            break
    return x, loss, evaluations


def fit_moments(
    model: MomentModel,
    target: ImageMoments,
    n_starts: int = 4,
    iterations: tuple[int, ...] = (100, 500),
    positivity_weight: float = 10.0,
    m2_weight: float = 1.0,
    whiten: bool = False,
    generator: torch.Generator | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    hops: int = 0,
    hop_iterations: int = 200,
    hop_tol: float = 0.0,
    verbose: bool = False,
    progress: bool = False,
    prior=None,
    prior_weight: float = 0.0,
    newton: int = 0,
) -> MomResult:
    """Fit ``(a, b)`` to moments: staged L-BFGS from several random starts (module docstring).

    Args:
        model: forward model (its CTF groups match the target's).
        target: moments (see :func:`~cryo_lightning.abinitio.image_moments.estimate_moments`).
        n_starts: random starts.
        iterations: L-BFGS iterations of the ``M1`` stage, of the ``M1 + M2`` stage and
            (optional third entry) of the ``M1 + M2 + M3`` stage, which needs ``target.m3`` and a
            model built with ``third=True``.
        positivity_weight: ``mu``, weight of the penalty on negative ``rho``.
        m2_weight: factor on the ``M2`` term.
        whiten: add a last stage that scales the moments entry by entry with
            :func:`~cryo_lightning.abinitio.moment_loss.whitening_scales`.
        generator: seeds the starts (CPU).
        init: optional ``(a0, b0)`` used as the first start (``b0`` with ``b_00``).
        hops: block basin hops (module docstring) from the best start, with the last stage's loss.
        hop_iterations: L-BFGS iterations of a hop's block refit and of its polish.
        hop_tol: stop hopping once the loss is at or below this (exact moments: the truth is at 0).
        verbose: print the loss of every start and hop.
        progress: show a progress bar over the hops (stderr).
        prior: optional ``a -> scalar`` energy (e.g. the negative log density of a learned
            Gaussian prior, :class:`~cryo_lightning.models.coefficient_prior.CoefficientPrior`)
            added to every stage's loss times ``prior_weight``: a MAP fit. Reported losses
            include it.
        prior_weight: its factor (0: no prior).
        newton: damped Newton steps on the last stage's loss at the very end
            (:func:`newton_polish`; 0: none).
    Returns:
        :class:`MomResult` of the best start.
    """
    t0 = time.perf_counter()
    dev = model.device
    target = target.to(dev)
    third = len(iterations) > 2 and iterations[2] > 0
    scales = whitening_scales(target) if whiten else None
    if whiten:  # a last, whitened stage with the same terms as the one before it
        iterations = tuple(iterations) + (iterations[-1],)
    if third and (target.m3 is None or not model.third):
        raise ValueError("a third stage needs target.m3 (third=True when estimating) and MomentModel(third=True)")
    nodes, _ = sphere_quadrature(2 * model.view_degree + 8, device=dev)
    # rho at a grid for the positivity penalty; linear in b.
    eye = torch.eye(model.b_count, dtype=torch.float64)
    rho_table = torch.stack(
        [SHViewingDistribution(e, model.view_degree).density(nodes.cpu()) for e in eye], dim=-1
    ).to(dev)

    best: MomResult | None = None
    losses, evaluations = [], 0
    for start in range(n_starts):
        if start == 0 and init is not None:
            a = init[0].to(dev, torch.float64).clone()
            b_rest = init[1].to(dev, torch.float64)[1:].clone()
        else:
            b_rest = SHViewingDistribution.random(model.view_degree, generator=generator).coeffs[1:].to(dev)
            a = torch.randn(model.basis.layout.count, generator=generator, dtype=torch.float64).to(dev)
            a = power_matched_start(model, target, a, torch.cat([b_rest.new_ones(1), b_rest]))
        a.requires_grad_(True)
        b_rest.requires_grad_(True)

        def full_b() -> torch.Tensor:
            return torch.cat([b_rest.new_ones(1), b_rest])

        for stage, n_iter in enumerate(iterations):
            if n_iter <= 0:
                continue
            use_m2, use_m3 = stage >= 1, stage >= 2 and third
            stage_scales = scales if whiten and stage == len(iterations) - 1 else None
            closure = _closure(model, a, b_rest, target, use_m2, use_m3, m2_weight, stage_scales, rho_table,
                               positivity_weight, prior, prior_weight)
            evaluations += _lbfgs([a, b_rest], closure, n_iter)
        with torch.no_grad():
            final = float(_objective(model, a, b_rest, target, True, third, m2_weight, scales, rho_table, 0.0, prior,
                                     prior_weight))
        losses.append(final)
        if verbose:
            print(f"start {start}: loss {final:.3e}")
        if best is None or final < best.loss:
            best = MomResult(a.detach().clone(), full_b().detach().clone(), model.view_degree, final)
    assert best is not None
    if hops > 0:
        a, b_rest, loss, best.hops_accepted, best.hop_losses, count = _basin_hop(
            model, target, best.coeffs, best.view_coeffs[1:], hops, hop_iterations, third,
            scales, rho_table, positivity_weight, m2_weight, generator, hop_tol, verbose, progress, prior, prior_weight)
        best.coeffs, best.view_coeffs, best.loss = a, torch.cat([b_rest.new_ones(1), b_rest]), loss
        evaluations += count
    if newton > 0:
        na = best.coeffs.numel()

        def loss_of(x: torch.Tensor, positivity: float = positivity_weight) -> torch.Tensor:
            return _objective(model, x[:na], x[na:], target, True, third, m2_weight, scales, rho_table, positivity,
                              prior, prior_weight)

        x, _, count = newton_polish(loss_of, torch.cat([best.coeffs, best.view_coeffs[1:]]), newton)
        best.coeffs, best.view_coeffs = x[:na], torch.cat([x.new_ones(1), x[na:]])
        with torch.no_grad():  # reported like the stages' losses: without the positivity penalty
            best.loss = float(loss_of(x, positivity=0.0))
        evaluations += count
    best.losses, best.seconds, best.evaluations = losses, time.perf_counter() - t0, evaluations
    return best


def map_polish(model: MomentModel, target: ImageMoments, a: torch.Tensor, b: torch.Tensor,
               prior_energy: Callable[[torch.Tensor], torch.Tensor], polish: int = 200, prior_strength: float = 0.1,
               third: bool = True, hops: int = 0, newton: int = 20, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Finish a learned reconstructor's output ``(a, b)`` by L-BFGS on the MAP loss.

    The loss is ``L(a, b) + prior_strength * eps * E(a)``: ``eps`` the moment loss expected at the
    truth from the moments' sampling error
    (:func:`~cryo_lightning.abinitio.moment_loss.expected_misfit`), ``E`` a learned coefficient
    prior's energy, so noisier moments lean more on the prior and exact ones not at all. If the
    polished misfit is still above ``2 eps`` (a wrong basin, and always so for exact moments) and
    ``hops > 0``, the classical endgame follows: a whitened stage, ``hops`` block basin hops and
    ``newton`` damped Newton steps (:func:`fit_moments`).

    Returns:
        coefficients, viewing coefficients, and the final loss (the MAP loss when polished).
    """
    if polish <= 0:
        with torch.no_grad():
            return a, b, float(moment_loss(model, a, b, target, use_m3=third))
    eps = expected_misfit(target, use_m3=third)
    stages = (0, 0, polish) if third else (0, polish)
    prior = {"prior": prior_energy, "prior_weight": prior_strength * eps}
    fit = fit_moments(model, target, n_starts=1, iterations=stages, init=(a, b), **prior)

    def misfit(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float(moment_loss(model, x, y, target, use_m3=third))

    if hops > 0 and misfit(fit.coeffs, fit.view_coeffs) > 2.0 * eps:
        fit = fit_moments(model, target, n_starts=1, iterations=stages, whiten=True,
                          init=(fit.coeffs, fit.view_coeffs), hops=hops, hop_iterations=polish,
                          newton=newton, generator=generator, **prior)
    a, b = fit.coeffs, fit.view_coeffs
    return a, b, misfit(a, b) + prior["prior_weight"] * float(prior_energy(a).detach())
