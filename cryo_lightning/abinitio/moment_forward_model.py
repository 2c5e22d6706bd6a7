"""Differentiable forward model of the image moments ``M1(a, b)``, ``M2(a, b)``.

Image model (pixel pipeline). The clean image of the volume with SFB coefficients ``a``
(:class:`~cryo_lightning.physics.fourier_bessel.SphericalFourierBesselBasis`) at RELION pose
``A`` with centred CTF ``H`` is::

    image(A) = Re ifft2c( H(xi) V_hat(A^T (xi, 0)) ),   xi on the L x L DFT grid,

the Fourier-slice theorem for the band-limited volume (it agrees with
:func:`~cryo_lightning.physics.projection.project` of the voxel map ``basis.evaluate(a)`` up to
that projector's interpolation error). Because ``V_hat(A^T k)`` is the spectrum of the rotated
volume, whose coefficients are ``rotate(a, A)`` exactly, the image coefficients in the
:class:`~cryo_lightning.abinitio.image_moments.MomentLayout` are::

    c(A) = P_H rotate(a, A),    P_H = expand o Re ifft2c o (H *) o slice_{kz = 0}   (complex matrix)

with ``P_H`` precomputed once per CTF group at the identity pose.

In-plane average, exactly. Write a pose as ``R_z(psi) A_v`` with ``A_v`` a fixed pose of viewing
direction ``v``. A rotation about ``z`` turns each pair ``(c_{l,s,m}, c_{l,s,-m})`` of
``b = rotate(a, A_v)`` by the angle ``m psi``, so with ``zeta_m = b_{+m} + i b_{-m}`` (per
``(l, s)``, ``l >= m``)::

    c(psi) = P_0 b_0 + sum_{m > 0} e^{i m psi} U_m zeta_m + e^{-i m psi} W_m conj(zeta_m),
    U_m = (P_{+m} - i P_{-m}) / 2,   W_m = (P_{+m} + i P_{-m}) / 2,

and orthogonality of ``e^{i m psi}`` gives the in-plane averages::

    E_psi[c]     = P_0 b_0
    E_psi[c c^H] = (P_0 b_0)(P_0 b_0)^H + sum_{m > 0} (U_m zeta_m)(U_m zeta_m)^H + (W_m conj zeta_m)(...)^H.

No steerability of the pixel grid is assumed: on a continuous disk ``W_m`` would map only into
the block ``k = m`` and ``U_m`` (frequency ``-m``, absent from the ``k >= 0`` layout) would
vanish; the square grid aliases angular frequencies modulo 4 (``k = +-m mod 4``), which at
``L = 32`` puts about 1e-4 of the energy (1e-2 in amplitude) into the other blocks. Keeping
the full ``P_H`` makes the model exact for the pixel pipeline.

Viewing directions. ``E_psi[c c^H]`` as a function of ``A_v`` is invariant under ``A -> R_z A``,
so it is a combination of ``D^J(A)[0, :]``, i.e. of spherical harmonics of ``v`` of degree
``J <= 2 l_max``; ``E_psi[c]`` has degree ``<= l_max``; ``rho`` has degree ``2h``. So
:func:`~cryo_lightning.physics.spherical_harmonics.sphere_quadrature` of degree ``2 l_max +
2h`` (``l_max + 2h`` for M1 alone) integrates both moments exactly::

    M1 = sum_j (w_j / 4 pi) rho(v_j) E_psi[c](v_j),     M2_k = sum_j (w_j / 4 pi) rho(v_j) E_psi[c_k c_k^H](v_j).

Third-moment slice (optional, :class:`~cryo_lightning.abinitio.image_moments.MomentLayout` block
``k = 0`` times ``c_k c_k^H``): ``E_psi[c_0t c c^H] = sum_{m1 + m2 = m3} z_{m1,0t} z_{m2} z_{m3}^H``.
Only ``m1 = 0 mod 4`` can reach block ``k = 0`` (the grid aliases modulo 4), so the sum runs over
those. Its integrand has degree ``<= 3 l_max`` in ``v``, so the quadrature degree becomes
``3 l_max + 2h`` when the model is built with ``third=True``.

CTF groups: one ``P_H`` per group; moments are returned per group (``(G, ...)``), to be compared
with :class:`~cryo_lightning.abinitio.image_moments.ImageMoments` of the same groups. ``rho`` is
linear in ``b`` (viewing-distribution coefficients of
:class:`~cryo_lightning.physics.viewing_sh.SHViewingDistribution`), ``M1`` is bilinear in
``(a, b)`` and ``M2`` quadratic in ``a`` and linear in ``b``; everything is differentiable.
"""

from __future__ import annotations

import math

import torch

from cryo_lightning.abinitio.image_moments import MomentLayout
from cryo_lightning.physics.fourier import frequency_grid, ifft2c
from cryo_lightning.physics.fourier_bessel import SphericalFourierBesselBasis
from cryo_lightning.physics.rotations import directions_to_rotations
from cryo_lightning.physics.spherical_harmonics import sphere_quadrature, wigner_d
from cryo_lightning.physics.viewing_sh import SHViewingDistribution, even_sh_count

__all__ = ["MomentModel", "slice_images"]


def slice_images(
    basis: SphericalFourierBesselBasis,
    coeffs: torch.Tensor,
    rotations: torch.Tensor,
    ctf: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images of the pixel pipeline (module docstring): ``Re ifft2c(H V_hat(A^T (xi, 0)))``.

    Evaluates the spectrum at the rotated grid directly with
    :meth:`~SphericalFourierBesselBasis.fourier_values` (independent of :meth:`MomentModel`'s
    factorisation, hence usable as a reference).

    Args:
        basis: volume basis.
        coeffs: ``(count,)`` real SFB coefficients.
        rotations: ``(N, 3, 3)`` RELION pose matrices.
        ctf: ``(L, L)`` or ``(N, L, L)`` centred CTF (``None``: no CTF).
    Returns:
        ``(N, L, L)`` float64 images.
    """
    L = basis.L
    dev = rotations.device
    ky, kx = frequency_grid(L, 2, device=dev, dtype=torch.float64)
    xi = torch.stack([kx, ky, torch.zeros_like(kx)], dim=-1)  # (L, L, 3), (x, y, z)
    k = torch.einsum("nji,yxj->nyxi", rotations.to(torch.float64), xi)  # A^T xi
    spec = basis.fourier_values(coeffs.to(dev, torch.float64), k)
    if ctf is not None:
        spec = spec * ctf.to(dev, torch.float64)
    return ifft2c(spec).real


class MomentModel:
    """``(a, b) -> (M1, M2)`` by exact quadrature over viewing directions (module docstring).

    Args:
        volume_basis: SFB basis of the volume (its ``l_max`` sets the quadrature).
        layout: image basis of the moments.
        view_degree: ``2h``, even degree of the viewing distribution.
        ctfs: ``(G, L, L)`` centred real CTFs of the groups (e.g. ``ctf_2d`` of the
            representatives of :func:`~cryo_lightning.abinitio.image_moments.group_by_defocus`);
            ``None`` for one group without CTF.
        device: where the tables live (default: the layout's device).
        third: also model the third-moment slice (:meth:`with_third`); raises the quadrature
            degree to ``3 l_max + 2h``.

    Attributes:
        n_groups: ``G``.
        nodes, weights: ``(V, 3)`` sphere nodes and ``(V,)`` weights / ``4 pi`` (sum 1).
        b_count: number of viewing-distribution coefficients (``b_00`` included).
    """

    def __init__(
        self,
        volume_basis: SphericalFourierBesselBasis,
        layout: MomentLayout,
        view_degree: int,
        ctfs: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        third: bool = False,
    ) -> None:
        if volume_basis.L != layout.L:
            raise ValueError(f"volume basis L={volume_basis.L} != image layout L={layout.L}")
        self.basis, self.layout, self.view_degree = volume_basis, layout, int(view_degree)
        self.device = torch.device(device) if device is not None else layout.device
        self.l_max = volume_basis.layout.l_max
        self.b_count = even_sh_count(self.view_degree)
        dev = self.device

        self.third = bool(third)
        nodes, weights = sphere_quadrature((3 if self.third else 2) * self.l_max + self.view_degree, device=dev)
        self.nodes, self.weights = nodes, weights / (4 * math.pi)
        poses = directions_to_rotations(nodes, psi=torch.zeros(nodes.shape[0], dtype=torch.float64, device=dev))
        self._wigner = [d.to(dev) for d in wigner_d(self.l_max, poses)]  # per l: (V, 2l+1, 2l+1)
        eye = torch.eye(self.b_count, dtype=torch.float64)
        # rho at the nodes is linear in b: tabulate it with unit coefficient vectors.
        self._rho_table = torch.stack(
            [SHViewingDistribution(e, self.view_degree).density(nodes.cpu()) for e in eye], dim=-1
        ).to(dev)  # (V, b_count)

        if ctfs is None:
            ctfs = torch.ones(1, layout.L, layout.L, dtype=torch.float64)
        self.n_groups = ctfs.shape[0]
        P = self._identity_projection(ctfs.to(dev, torch.float64))  # (G, n_img, count)
        self._P = P
        lsm = volume_basis.layout.lsm(dev)
        self._idx0 = torch.nonzero(lsm[:, 2] == 0).flatten()
        self._P0 = P[:, :, self._idx0]
        self._idx_pm: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._U: list[torch.Tensor] = []
        self._W: list[torch.Tensor] = []
        for m in range(1, self.l_max + 1):
            plus, minus = [], []
            for l in range(m, self.l_max + 1):
                for s in range(volume_basis.layout.radial_counts[l]):
                    plus.append(volume_basis.layout.index(l, s, m))
                    minus.append(volume_basis.layout.index(l, s, -m))
            ip, im = torch.tensor(plus, device=dev), torch.tensor(minus, device=dev)
            self._idx_pm.append((ip, im))
            self._U.append(0.5 * (P[:, :, ip] - 1j * P[:, :, im]))
            self._W.append(0.5 * (P[:, :, ip] + 1j * P[:, :, im]))
        # in-plane frequency of each component of in_plane_components: 0, +1, -1, +2, -2, ...
        freqs = [0] + [f for m in range(1, self.l_max + 1) for f in (m, -m)]
        pos = {f: i for i, f in enumerate(freqs)}
        self._triples: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (m1, m2 slots, m1 + m2 slots)
        for m1 in range(-(self.l_max // 4) * 4, self.l_max + 1, 4):
            pairs = [(pos[f], pos[f + m1]) for f in freqs if f + m1 in pos]
            self._triples.append((pos[m1], torch.tensor([p for p, _ in pairs], device=dev),
                                  torch.tensor([q for _, q in pairs], device=dev)))

    # ----------------------------------------------------------------------------- tables
    def _identity_projection(self, ctfs: torch.Tensor) -> torch.Tensor:
        """``P_H`` for every group: image coefficients of each unit SFB vector at the identity pose."""
        n = self.basis.layout.count
        eye = torch.eye(n, dtype=torch.float64, device=self.device)
        identity = torch.eye(3, dtype=torch.float64, device=self.device)[None]
        out = []
        for ctf in ctfs:
            cols = []
            for chunk in torch.split(eye, 256):
                imgs = torch.stack([slice_images(self.basis, e, identity, ctf)[0] for e in chunk])
                cols.append(self.layout.expand(imgs))
            out.append(torch.cat(cols).T)  # (n_img, count)
        return torch.stack(out)

    # ----------------------------------------------------------------------------- model
    def viewing_density(self, b: torch.Tensor) -> torch.Tensor:
        """``rho`` at the quadrature nodes, ``(V,)``, from ``(b_count,)`` coefficients (``b_00`` included)."""
        return self._rho_table.to(b.dtype) @ b

    def rotated_coefficients(self, a: torch.Tensor) -> torch.Tensor:
        """``rotate(a, A_v)`` at every node: ``(V, count)``."""
        blocks = self.basis.layout.blocks(a)
        return self.basis.layout.from_blocks(
            [torch.einsum("sm,vnm->vsn", blk, self._wigner[l].to(a.dtype)) for l, blk in enumerate(blocks)]
        )

    def in_plane_components(self, a: torch.Tensor) -> torch.Tensor:
        """Components ``z`` with ``c(R_z(psi) A_v) = sum_m e^{i m psi} z_m(v)`` (module docstring).

        Returns:
            ``(G, V, 2 l_max + 1, n_img)`` complex: ``m = 0``, then ``+m`` (``U_m zeta_m``) and
            ``-m`` (``W_m conj zeta_m``) for ``m = 1..l_max``.
        """
        b = self.rotated_coefficients(a)  # (V, count)
        cdt = torch.complex128 if a.dtype == torch.float64 else torch.complex64
        zs = [torch.einsum("gqc,vc->gvq", self._P0.to(cdt), b[:, self._idx0].to(cdt))]
        for (ip, im), U, W in zip(self._idx_pm, self._U, self._W):
            zeta = torch.complex(b[:, ip], b[:, im])
            zs.append(torch.einsum("gqc,vc->gvq", U.to(cdt), zeta))
            zs.append(torch.einsum("gqc,vc->gvq", W.to(cdt), zeta.conj()))
        return torch.stack(zs, dim=2)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Moments of the images of volume ``a`` under viewing distribution ``b``.

        Args:
            a: ``(count,)`` real SFB coefficients (float64 for exactness; float32 works).
            b: ``(b_count,)`` viewing-distribution coefficients, ``b_00`` included (1 for a
                normalised density).
        Returns:
            ``m1 (G, n_img)`` and, per ``k``, ``m2_k (G, Q_k, Q_k)``, complex, per CTF group; the
            same representation as :class:`~cryo_lightning.abinitio.image_moments.ImageMoments`.
        """
        m1, m2, _ = self._moments(a, b, third=False)
        return m1, m2

    def with_third(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``M1``, ``M2`` and the third-moment slice (model built with ``third=True``).

        Returns:
            ``m1``, ``m2`` as :meth:`__call__`, and per ``k`` ``m3_k (G, Q_0, Q_k, Q_k)``
            complex, ``m3_k[g, t] = E[c_0t c_k c_k^H]`` (the layout of
            :class:`~cryo_lightning.abinitio.image_moments.ImageMoments`).
        """
        if not self.third:
            raise ValueError("this MomentModel was built without third=True (its quadrature is not exact for M3)")
        return self._moments(a, b, third=True)

    def _moments(self, a: torch.Tensor, b: torch.Tensor, third: bool):
        z = self.in_plane_components(a)  # (G, V, M, n)
        wr = (self.weights.to(a.dtype) * self.viewing_density(b.to(a.dtype))).to(z.dtype)  # (V,)
        m1 = torch.einsum("v,gvq->gq", wr, z[:, :, 0])
        blocks = torch.split(z, self.layout.block_sizes, dim=-1)
        m2 = [torch.einsum("v,gvmq,gvmr->gqr", wr, zk, zk.conj()) for zk in blocks]
        if not third:
            return m1, m2, None
        q0 = self.layout.block_sizes[0]
        m3 = []
        for zk in blocks:
            out = 0
            for slot, i2, i3 in self._triples:
                alpha = wr[None, :, None] * z[:, :, slot, :q0]  # (G, V, Q0)
                integrand = torch.einsum("gvmq,gvmr->gvqr", zk[:, :, i2], zk[:, :, i3].conj()).flatten(2)
                out = out + torch.einsum("gvt,gvx->gtx", alpha, integrand)
            m3.append(out.view(z.shape[0], q0, zk.shape[-1], zk.shape[-1]))
        return m1, m2, m3

    def project_coefficients(self, a: torch.Tensor, rotations: torch.Tensor, group: int = 0) -> torch.Tensor:
        """Image coefficients ``c(A) = P_H rotate(a, A)`` at given RELION poses.

        Args:
            a: ``(count,)`` real SFB coefficients.
            rotations: ``(N, 3, 3)``.
            group: CTF group.
        Returns:
            ``(N, n_img)`` complex128.
        """
        rot = self.basis.rotate(a.to(self.device, torch.float64), rotations.to(self.device, torch.float64))
        return rot.to(torch.complex128) @ self._P[group].T
