"""Polar set transformer: denoises a set of projections of one molecule by rotational attention.

Each image attends to every other image of its set *and* to every in-plane rotation of it: the
attention logits are learned, CTF-sign-corrected circular cross-correlations of the images' polar
spectra (``H`` heads with learned radial weightings), so attention is learned clustering (which
images show similar views) and alignment (at which rotation) at once. The values are the other
images' spectra rotated accordingly, combined as a CTF-weighted (Wiener) average of the aligned
images, then shrunk by a per-set Wiener gain with a learned per-radius noise inflation, and
multiplied by the target image's own CTF (the target is the clean, CTF-affected image), and
finally restricted to a learned radial support in real space.

With the CWF guide, the covariance Wiener filter can also use a population prior
(``cwf_prior_strength > 0``): the mean and covariance of the projections of each of the first
``cwf_prior_molecules`` training molecules, per unit signal power, of which each set takes a
likelihood-weighted mixture and blends it with its own statistics (see
``cryo_lightning.denoise.population_prior.PopulationPrior``). At L = 32 and N = 128 the per-set
covariance is the weak point of the CWF, and this prior recovers much of what it misses. The prior
is a buffer, fitted once by :meth:`PolarSetTransformer.fit_population` from clean training targets
(``DenoiseTask`` does it at the start of training, from the images of the first training epoch)
and saved in checkpoints, so a trained model needs no training data later.

Optionally (``refine_channels > 0``) a convolutional refiner adds a learned, nonlinear prior on
top of the averaging: a U-Net sees the noisy image, the set estimate and the CWF guide (in units
of the noise standard deviation) and predicts a correction to the estimate. Averaging removes
most of the noise; the refiner removes what the linear Wiener shrinkage leaves and sharpens
what imperfect neighbours blurred.

In-plane rotation is handled by construction: rotating any input image by ``2 pi s / T`` shifts
its polar spectrum by ``s`` samples, which the circular correlations absorb, so the output rotates
with the input (up to polar interpolation). The refiner is made equivariant to quarter turns by
averaging it over the four rotations of its input in evaluation mode (in training, the data are
already uniform over in-plane angles). Any set size works; compute grows as ``N^2 R T`` (every
pair of images correlated over ``R`` radii and ``T`` angles) and memory as ``N^2 H T`` (the
correlations of each head at every angle).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cryo_lightning.denoise.cwf import cwf_denoise
from cryo_lightning.denoise.population_prior import PopulationPrior
from cryo_lightning.models.unet import UNet
from cryo_lightning.physics.fourier import radial_grid
from cryo_lightning.physics.noise import estimate_noise_variance
from cryo_lightning.physics.polar import PolarSpectrum
from cryo_lightning.physics.steerable_basis import fourier_bessel_basis

__all__ = ["PolarSetTransformer"]


class PolarSetTransformer(nn.Module):
    """Learned rotational attention + Wiener averaging over a set of images.

    Args:
        L: image size (pixels).
        n_radii: polar radii ``R`` from 0 to Nyquist.
        n_angles: polar angles ``T`` (in-plane rotation resolution ``360 / T`` degrees).
        heads: attention heads (each with its own radial weighting and temperature).
        similarity_radius: fraction of Nyquist used for the attention correlations (the low
            frequencies carry the signal at low SNR).
        layers: attention layers; each later layer compares the previous layer's estimates.
        guide: ``"cwf"`` starts from the covariance Wiener filter's estimates (see
            ``cryo_lightning.denoise.cwf``) and mixes them into the output; ``"none"`` starts
            from the noisy images.
        refine_channels: width of the convolutional refiner (a depth-3 U-Net); 0: none.
        cwf_prior_strength: weight ``nu`` (in images) of the population prior in the CWF guide;
            0: the classical CWF of each set alone. Needs ``guide="cwf"`` and
            :meth:`fit_population` before use.
        cwf_prior_tempering: ``beta`` in [0, 1] of the prior's molecule weights (0: their plain
            average; 1: the Bayes posterior).
        cwf_prior_molecules: molecules in the prior (see ``SyntheticSetDataModule.train_targets``).
    """

    def __init__(self, L: int = 32, n_radii: int = 33, n_angles: int = 128, heads: int = 4,
                 similarity_radius: float = 0.5, layers: int = 2, guide: str = "none",
                 refine_channels: int = 0, cwf_prior_strength: float = 0.0, cwf_prior_tempering: float = 0.0,
                 cwf_prior_molecules: int = 64) -> None:
        super().__init__()
        if guide not in ("none", "cwf"):
            raise ValueError(f"guide must be 'none' or 'cwf', got {guide!r}")
        if cwf_prior_strength < 0 or (cwf_prior_strength > 0 and guide != "cwf"):
            raise ValueError(f"cwf_prior_strength must be >= 0 and needs guide='cwf', got {cwf_prior_strength} "
                             f"with guide={guide!r}")
        if not 0 <= cwf_prior_tempering <= 1 or cwf_prior_molecules < 1:
            raise ValueError(f"cwf_prior_tempering must be in [0, 1] and cwf_prior_molecules >= 1, got "
                             f"{cwf_prior_tempering} and {cwf_prior_molecules}")
        self.cwf_prior_strength, self.cwf_prior_tempering = float(cwf_prior_strength), float(cwf_prior_tempering)
        self.cwf_prior_molecules = int(cwf_prior_molecules)
        if self.cwf_prior_strength > 0:
            size = PopulationPrior.flat_size(fourier_bessel_basis(L))
            self.register_buffer("cwf_prior", torch.zeros(self.cwf_prior_molecules, size, dtype=torch.float64))
            self.register_buffer("cwf_prior_fitted", torch.tensor(False))
        self.L, self.heads, self.guide = L, heads, guide
        # With guide="cwf" the first layer finds neighbours and rotations from the covariance
        # Wiener filter's estimates (a classical multi-image denoiser, rotation-equivariant), and
        # the output mixes that estimate with the attention average per radius.
        self.guide_mix = nn.Parameter(torch.zeros(n_radii))
        self.polar = PolarSpectrum(L, n_radii, n_angles)
        self.n_sim = max(2, int(round(similarity_radius * (n_radii - 1))) + 1)
        self.layers = nn.ModuleList(_RotationalAttention(n_radii, self.n_sim, heads) for _ in range(layers))
        # A learned radial real-space support (particles sit in a disk), rotation-invariant by
        # construction; starts as a soft disk of radius 0.4 L.
        radii = torch.arange(L // 2 + 2, dtype=torch.float32)
        self.support_logits = nn.Parameter((0.4 * L - radii) / 1.5)
        r = radial_grid(L, 2).clamp_max(L // 2 + 1)
        self.register_buffer("_radius", r, persistent=False)
        self.refiner = UNet(depth=3, channels=refine_channels, in_channels=3) if refine_channels > 0 else None
        if self.refiner is not None:
            nn.init.zeros_(self.refiner.head.weight)  # starts as the plain set estimate
            nn.init.zeros_(self.refiner.head.bias)

    @property
    def needs_population(self) -> bool:
        """True while a population prior is configured but not fitted yet."""
        return self.cwf_prior_strength > 0 and not bool(self.cwf_prior_fitted)

    def fit_population(self, molecules: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Fit the CWF guide's population prior, one molecule at a time.

        Args:
            molecules: ``cwf_prior_molecules`` pairs of ``(n, L, L)`` clean images of one molecule
                (uniform poses, any scale) and their centred CTFs ``(n, L, L)`` or None.
        """
        if self.cwf_prior_strength <= 0:
            raise ValueError("fit_population: this model has no population prior (cwf_prior_strength = 0)")
        device = self.cwf_prior.device
        basis = fourier_bessel_basis(self.L, device)

        def checked():
            for images, ctf in molecules:
                if images.ndim != 3 or images.shape[-2:] != (self.L, self.L):
                    raise ValueError(f"fit_population wants (n, {self.L}, {self.L}) images per molecule, "
                                     f"got {tuple(images.shape)}")
                yield images.to(device).float(), None if ctf is None else ctf.to(device).float()

        prior = PopulationPrior.fit(checked(), basis)
        if len(prior) != self.cwf_prior_molecules:
            raise ValueError(f"fit_population got {len(prior)} molecules, the model holds {self.cwf_prior_molecules}")
        self.cwf_prior.copy_(prior.flatten())
        self.cwf_prior_fitted.fill_(True)

    def population_prior(self, device: torch.device | str | None = None) -> PopulationPrior | None:
        """The fitted population prior of the CWF guide, or None when the model has none."""
        if self.cwf_prior_strength <= 0:
            return None
        if self.needs_population:
            raise RuntimeError("PolarSetTransformer: cwf_prior_strength > 0 but the population prior is not "
                               "fitted; call fit_population(clean projections of the training molecules) first "
                               "(DenoiseTask does this at the start of training)")
        return PopulationPrior.unflatten(self.cwf_prior, fourier_bessel_basis(self.L, device))

    def forward(self, noisy: torch.Tensor, ctf: torch.Tensor | None = None,
                noise_variance: torch.Tensor | None = None) -> torch.Tensor:
        """Denoise sets.

        Args:
            noisy: ``(B, N, L, L)`` images (any units).
            ctf: ``(B, N, L, L)`` centred CTF of each image, or None (no CTF).
            noise_variance: ``(B,)`` white-noise variance per set; None: estimated from the
                corners outside the inscribed disk.
        Returns:
            ``(B, N, L, L)`` estimates of the clean, CTF-affected images.
        """
        B, N, L, _ = noisy.shape
        if ctf is None:
            ctf = torch.ones_like(noisy)
        if noise_variance is None:
            noise_variance = estimate_noise_variance(noisy).mean(-1)
        spec = self.polar(noisy.float())  # (B, N, R, T) complex
        c = self.polar.sample_ctf(ctf.float())  # (B, N, R, T) real
        noise = noise_variance.float()[:, None, None, None] * L * L  # per Fourier coefficient
        # The radial signal spectrum S(r) of the projections, for the Wiener gains.
        power = spec.abs().square().mean((1, 3))  # (B, R)
        c2_mean = (c * c).mean((1, 3)).clamp_min(1e-3)
        signal = ((power - noise[:, :, 0, 0]) / c2_mean).clamp_min(0)[:, None, :, None]  # (B, 1, R, 1)
        estimate = spec  # the first layer compares the noisy images themselves...
        guide_image = self._guide(noisy, ctf, noise_variance)
        if guide_image is not None:  # ... or their covariance-Wiener estimates
            guide = self.polar(guide_image)
            estimate = guide
        for layer in self.layers:
            # Later layers find neighbours and rotations from the previous, cleaner estimates.
            estimate = layer(estimate[:, :, : self.n_sim], spec, c, noise, signal)
        if self.guide == "cwf":
            mix = torch.sigmoid(self.guide_mix)[None, None, :, None]
            estimate = mix * guide + (1 - mix) * estimate
        out = self.polar.inverse(estimate) * self.support()
        if self.refiner is not None:
            scale = noise_variance.float().clamp_min(1e-12).sqrt()[:, None, None, None]
            reference = out if guide_image is None else guide_image
            x = torch.stack([noisy.float(), out, reference], 2).flatten(0, 1) / scale.repeat_interleave(N, 0)
            out = out + self._refine(x).reshape(B, N, L, L) * scale
        return out

    @torch.no_grad()
    def _guide(self, noisy: torch.Tensor, ctf: torch.Tensor, noise_variance: torch.Tensor) -> torch.Tensor | None:
        """The CWF guide images ``(B, N, L, L)``, or None without a guide."""
        if self.guide != "cwf":
            return None
        return cwf_denoise(noisy.float(), ctf.float(), noise_variance.float(),
                           prior=self.population_prior(noisy.device), prior_strength=self.cwf_prior_strength,
                           prior_tempering=self.cwf_prior_tempering)

    @torch.no_grad()
    def neighbour_weights(self, noisy: torch.Tensor, ctf: torch.Tensor | None = None,
                          noise_variance: torch.Tensor | None = None,
                          queries: torch.Tensor | None = None) -> torch.Tensor:
        """How much each image draws from every other image in the first attention layer.

        Args:
            noisy, ctf, noise_variance: as for :meth:`forward`.
            queries: ``(B, N, L, L)`` images to compare instead of the layer's own inputs (the
                guide, or the noisy images), e.g. the clean images: what perfect inputs would give.
        Returns:
            ``(B, N, N)`` attention mass of image ``i`` (row) on image ``j``, summed over in-plane
            rotations and heads; rows sum to 1, the diagonal is 0.
        """
        if not len(self.layers):
            raise ValueError("neighbour_weights: this model has no attention layer (layers = 0)")
        if ctf is None:
            ctf = torch.ones_like(noisy)
        if noise_variance is None:
            noise_variance = estimate_noise_variance(noisy).mean(-1)
        if queries is None:
            queries = self._guide(noisy, ctf, noise_variance)
            queries = noisy if queries is None else queries
        A, _ = self.layers[0]._attention(self.polar(queries.float())[:, :, : self.n_sim],
                                         self.polar.sample_ctf(ctf.float()))
        return A[..., 0].real  # angular frequency 0 of the weights: their sum over rotations

    def _refine(self, x: torch.Tensor) -> torch.Tensor:
        """Refiner correction of ``(M, 3, L, L)`` inputs, averaged over quarter turns when evaluating."""
        if self.training:
            return self.refiner.correction(x)[:, 0]
        turns = [torch.rot90(self.refiner.correction(torch.rot90(x, k, (-2, -1))), -k, (-2, -1)) for k in range(4)]
        return torch.stack(turns).mean(0)[:, 0]

    def support(self) -> torch.Tensor:
        """The learned support ``(L, L)`` in [0, 1]: a radial profile, linearly interpolated."""
        profile = torch.sigmoid(self.support_logits)
        lo = self._radius.floor().long().clamp_max(len(profile) - 2)
        frac = self._radius - lo
        return profile[lo] * (1 - frac) + profile[lo + 1] * frac


class _RotationalAttention(nn.Module):
    """One layer: attention over (image, in-plane rotation) pairs, then Wiener averaging."""

    def __init__(self, n_radii: int, n_sim: int, heads: int) -> None:
        super().__init__()
        # Radial weights of the similarity (softplus), one profile per head, varied at init.
        init = torch.linspace(0, 1, n_sim)[None, :] * torch.linspace(-2, 2, heads)[:, None]
        self.similarity_weight = nn.Parameter(init)
        self.log_temperature = nn.Parameter(torch.full((heads,), math.log(20.0)))
        self.head_logits = nn.Parameter(torch.zeros(heads))
        self.self_weight = nn.Parameter(torch.tensor(-2.0))  # softplus -> weight of the image itself
        self.noise_inflation = nn.Parameter(torch.zeros(n_radii))  # softplus(.)/softplus(0) = 1 at init

    def _attention(self, query: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over (other image j, rotation delta), as angular spectra of the weights and
        of their squares, heads mixed: two ``(B, N, N, T)`` complex tensors."""
        N, T = query.shape[1], query.shape[-1]
        g = torch.sign(c[:, :, : query.shape[2]]) * query
        w = F.softplus(self.similarity_weight)  # (H, Rs)
        gh = g[:, None] * w[None, :, None, :, None]  # (B, H, N, Rs, T)
        gh = gh / gh.abs().square().sum((-1, -2), keepdim=True).clamp_min(1e-12).sqrt()
        G = torch.fft.fft(gh, dim=-1)  # angular frequencies
        cross = torch.einsum("bhirm,bhjrm->bhijm", G.conj(), G)  # (B, H, N, N, T)
        corr = torch.fft.ifft(cross, dim=-1).real * T  # sum_theta g_i(theta) g_j(theta + delta)
        logits = corr * self.log_temperature.exp()[None, :, None, None, None]
        eye = torch.eye(N, dtype=torch.bool, device=query.device)[None, None, :, :, None]
        logits = logits.masked_fill(eye, float("-inf"))
        attn = torch.softmax(logits.flatten(-2), dim=-1).reshape(logits.shape)  # over (j, delta)
        # y(theta) = sum_d a(d) x(theta + d)  <=>  Y(m) = conj(A(m)) X(m) for real a.
        head_w = torch.softmax(self.head_logits, 0)[None, :, None, None, None]
        A = (torch.fft.fft(attn, dim=-1).conj() * head_w).sum(1)
        A2 = (torch.fft.fft(attn.square(), dim=-1).conj() * head_w).sum(1)
        return A, A2

    def forward(self, query: torch.Tensor, spec: torch.Tensor, c: torch.Tensor, noise: torch.Tensor,
                signal: torch.Tensor) -> torch.Tensor:
        """``query`` (B, N, Rs, T) spectra compared for attention; ``spec``/``c`` (B, N, R, T) the
        noisy polar spectra and CTFs; ``noise`` (B, 1, 1, 1) and ``signal`` (B, 1, R, 1) per
        Fourier coefficient. Returns the (B, N, R, T) estimate of the clean CTF-affected spectra."""
        cf = torch.fft.fft(c * spec, dim=-1)  # (B, N, R, T)
        c2 = torch.fft.fft(c * c, dim=-1)
        if spec.shape[1] > 1:
            A, A2 = self._attention(query, c)
            num = torch.fft.ifft(torch.einsum("bijm,bjrm->birm", A, cf), dim=-1)
            den = torch.fft.ifft(torch.einsum("bijm,bjrm->birm", A, c2), dim=-1).real
            den2 = torch.fft.ifft(torch.einsum("bijm,bjrm->birm", A2, c2), dim=-1).real
        else:  # a set of one: nothing to attend to
            num, den, den2 = torch.zeros_like(spec), torch.zeros_like(c), torch.zeros_like(c)
        gamma = F.softplus(self.self_weight)
        num = num + gamma * c * spec
        den = den + gamma * c * c
        den2 = den2 + gamma**2 * c * c
        average = num / den.clamp_min(1e-6)  # estimate of the projection spectrum in image i's frame
        average_noise = noise * den2 / den.clamp_min(1e-6).square()
        inflation = F.softplus(self.noise_inflation) / math.log(2.0)
        gain = signal / (signal + inflation[None, None, :, None] * average_noise + 1e-12)
        return c * gain * average
