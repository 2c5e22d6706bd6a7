"""Learned moment reconstructor: an unrolled, SO(3)- and O(3)-equivariant solver of the moment equations.

Image moments are invariant under rotating (or mirroring) the molecule together with its viewing
distribution, so no network from moments to a volume can be equivariant in its input. Instead
(DESIGN section 4.5) the network refines a *start* ``(a_0, b_0)`` by ``K`` learned steps that
see the moment loss only through invariant scalars and its gradient::

    g_a, g_b = grad L(a_k, b_k)                   (L invariant  =>  gradients equivariant)
    (da, db) = Step_k(a_k, b_k, g_a, g_b, s_k)    (e3nn irreps layers, O(3)-equivariant)
    a_{k+1} = a_k + |a_k| da,   b_{k+1} = b_k + db   (b_00 = 1 kept)

with ``s_k`` invariant scalars (``log L``, ``log |g_a|``, ``log |g_b|``, ``log |a_k|``). Each step
is a channel mixing of every input of the same degree (a learned, radially coupled
preconditioner of the gradient), a gated nonlinearity whose gates read the invariant scalars,
and a tensor product with the viewing coefficients (the physics couples volume degrees
``l1, l2`` through ``b_L`` with ``|l1 - l2| <= L <= l1 + l2``). Every layer is e3nn, so for any
``R`` in O(3): rotating and mirroring the start rotates and mirrors the output.

Conventions. Volume coefficients are the SFB vectors of
:class:`~cryo_lightning.physics.fourier_bessel.SphericalFourierBesselBasis` (``l`` ascending,
then ``s``, then ``m``), which is e3nn's multiplicity-major layout for the irreps
``layout.irreps()`` (``S_l x l`` with parity ``(-1)^l``). Viewing coefficients are those of
:class:`~cryo_lightning.physics.viewing_sh.SHViewingDistribution` (even ``l``, parity even).
The project's real harmonics are e3nn's in a permuted frame (``physics/spherical_harmonics.py``:
``D_l(R) = e3nn D_l(P R P^T)``), so e3nn layers are equivariant in the project's convention
without any change of basis; ``tests/models/test_reconstructor.py`` pins this.

The loss is injected (``loss_fn(a, b) -> scalar``, e.g. a closure over
:func:`~cryo_lightning.abinitio.moment_loss.moment_loss` and target moments), so this module holds no
physics. Gradients enter as features and are not differentiated through (first-order unrolling),
which keeps training cost at ``K`` loss gradients per example.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from e3nn import nn as e3nn_nn
from e3nn import o3
from torch import nn

from cryo_lightning.models.coefficient_prior import CoefficientPrior

__all__ = ["MomentReconstructor", "EquivariantStep", "viewing_irreps"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def viewing_irreps(degree: int) -> o3.Irreps:
    """Irreps of even-degree viewing coefficients ``0e + 2e + ... + degree e``."""
    return o3.Irreps("+".join(f"1x{l}e" for l in range(0, degree + 1, 2)))


def _hidden_irreps(l_max: int, channels: int) -> o3.Irreps:
    return o3.Irreps("+".join(f"{channels}x{l}{'eo'[l % 2]}" for l in range(l_max + 1)))


class EquivariantStep(nn.Module):
    """One update ``(a, b, g_a, g_b, scalars) -> (da, db_rest)``, O(3)-equivariant.

    Args:
        volume_irreps: irreps of ``a`` (``SFBLayout.irreps()``).
        view_degree: even degree of ``b``.
        channels: multiplicity of each hidden degree.
        n_scalars: number of invariant scalar inputs.
    """

    def __init__(self, volume_irreps: o3.Irreps, view_degree: int, channels: int, n_scalars: int) -> None:
        super().__init__()
        self.volume_irreps = o3.Irreps(volume_irreps)
        self.view_irreps = viewing_irreps(view_degree)
        l_max = self.volume_irreps.lmax
        hidden = _hidden_irreps(l_max, channels)
        scalars_in = o3.Irreps(f"{n_scalars}x0e")
        # input layout: a, g_a, b, g_b, scalars (concatenated in that order)
        irreps_in = self.volume_irreps + self.volume_irreps + self.view_irreps + self.view_irreps + scalars_in
        gated = o3.Irreps([(mul, ir) for mul, ir in hidden if ir.l > 0])
        scal = o3.Irreps([(mul, ir) for mul, ir in hidden if ir.l == 0])
        gates = o3.Irreps(f"{gated.num_irreps}x0e")
        self.mix = o3.Linear(irreps_in, scal + gates + gated)
        self.gate = e3nn_nn.Gate(scal, [torch.nn.functional.silu], gates, [torch.sigmoid], gated)
        self.couple = o3.FullyConnectedTensorProduct(self.gate.irreps_out, self.view_irreps, hidden)
        self.out_a = o3.Linear(self.gate.irreps_out + hidden, self.volume_irreps)
        view_rest = o3.Irreps([(mul, ir) for mul, ir in self.view_irreps if ir.l > 0])
        self.out_b = o3.Linear(self.gate.irreps_out + hidden, view_rest) if view_rest.dim else None

    def forward(self, a: torch.Tensor, b: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor,
                scalars: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All inputs ``(B, dim)``; returns ``da (B, volume dim)`` and ``db (B, b_count - 1)``."""
        h = self.gate(self.mix(torch.cat([a, ga, b, gb, scalars], dim=-1)))
        h2 = self.couple(h, b)
        feats = torch.cat([h, h2], dim=-1)
        # unit-variance outputs per component would move the (unit-norm) iterate by sqrt(dim)
        da = self.out_a(feats) / self.volume_irreps.dim ** 0.5
        db = self.out_b(feats) / self.view_irreps.dim ** 0.5 if self.out_b is not None else b.new_zeros(b.shape[:-1] + (0,))
        return da, db


class MomentReconstructor(nn.Module):
    """``K`` unrolled equivariant steps on the moment loss (module docstring).

    Args:
        volume_irreps: irreps of the SFB coefficients (``basis.layout.irreps()``).
        view_degree: even degree ``2h`` of the viewing distribution.
        steps: ``K``.
        channels: hidden multiplicity per degree.
        shared: one step module for all ``K`` steps (otherwise one per step).

    Attributes:
        prior: a :class:`CoefficientPrior` over the volume coefficients, fitted to the training
            molecules by the task and saved with the weights; the MAP polish of
            :class:`~cryo_lightning.tasks.learned_fit.LearnedFit` uses it.

    Shapes: ``a (B, count)`` float, ``b (B, b_count)`` with ``b[:, 0] = 1``.
    """

    n_scalars = 4

    def __init__(self, volume_irreps: str | o3.Irreps, view_degree: int, steps: int = 6, channels: int = 8,
                 shared: bool = False) -> None:
        super().__init__()
        self.volume_irreps = o3.Irreps(volume_irreps)
        self.view_degree = int(view_degree)
        self.steps = int(steps)
        n_modules = 1 if shared else self.steps
        self.step_modules = nn.ModuleList(
            EquivariantStep(self.volume_irreps, self.view_degree, channels, self.n_scalars) for _ in range(n_modules)
        )
        self.prior = CoefficientPrior(self.volume_irreps)

    def forward(self, a0: torch.Tensor, b0: torch.Tensor, loss_fn: LossFn, return_path: bool = False,
                through_target: bool = False) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, list]:
        """Refine starts ``(a0, b0)`` against ``loss_fn`` (evaluated per example).

        Args:
            a0: ``(B, count)`` starts.
            b0: ``(B, b_count)``, ``b0[:, 0] = 1``.
            loss_fn: ``(a (count,), b (b_count,)) -> scalar``, invariant under joint rotation and
                mirroring; called once per example and step.
            return_path: also return the per-step ``(a, b)``.
            through_target: keep the graph from the loss gradients back to whatever ``loss_fn``
                closes over (target moments formed from denoised images, in joint training), so
                the output is differentiable in the target; the iterates stay first-order.
        Returns:
            ``a (B, count)``, ``b (B, b_count)`` (and the path).
        """
        a, b = a0, b0
        path = []
        for k in range(self.steps):
            step = self.step_modules[k % len(self.step_modules)]
            ga, gb, values = _loss_gradients(loss_fn, a, b, through_target)
            scale = a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            ga_norm = ga.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            gb_norm = gb.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            scalars = torch.cat([values.clamp_min(1e-30).log()[:, None], ga_norm.log(), gb_norm.log(),
                                 scale.log()], dim=-1).to(a.dtype)
            # the network runs in its parameters' dtype; the iterate keeps the caller's
            dt = next(step.parameters()).dtype
            da, db = step((a / scale).to(dt), b.to(dt), (ga / ga_norm).to(dt), (gb / gb_norm).to(dt), scalars.to(dt))
            a = a + scale * da.to(a.dtype)
            b = torch.cat([b[:, :1], b[:, 1:] + db.to(b.dtype)], dim=-1)
            if return_path:
                path.append((a, b))
        return (a, b, path) if return_path else (a, b)


def _loss_gradients(loss_fn: LossFn, a: torch.Tensor, b: torch.Tensor, through_target: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example ``grad_a L``, ``grad_b L`` (``b_00`` component zeroed) and ``L``, detached from
    ``a`` and ``b``; with ``through_target`` still attached to the tensors ``loss_fn`` closes over."""
    gas, gbs, vals = [], [], []
    keep = through_target and torch.is_grad_enabled()  # the caller's mode: inside, grad is always on
    with torch.enable_grad():
        for ai, bi in zip(a.detach(), b.detach()):
            ai = ai.clone().requires_grad_(True)
            bi = bi.clone().requires_grad_(True)
            value = loss_fn(ai, bi)
            ga, gb = torch.autograd.grad(value, (ai, bi), create_graph=keep)
            gas.append(ga)
            gbs.append(torch.cat([gb.new_zeros(1), gb[1:]]))
            vals.append(value if keep else value.detach())
    return torch.stack(gas), torch.stack(gbs), torch.stack(vals)
