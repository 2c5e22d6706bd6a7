"""Rotational set transformer: learned attention across the images of one molecule.

Every image of a set becomes a token of steerable features: its polar spectrum (and CTF) Fourier
transformed along the angle, so that an in-plane rotation by ``phi`` multiplies the angular
frequency ``m`` by ``exp(-i m phi)``. All learned maps act per angular frequency (complex linear
maps over channels, norm-gated MLPs, RMS normalisation over the token), so they commute with
rotations, and attention is taken jointly over *other tokens and in-plane rotations*: the
logits of query ``i`` against key ``j`` rotated by ``delta`` are ``Re sum_m Q_im conj(K_jm)
exp(i m delta)`` (one inverse FFT over ``m`` gives every ``delta``), and the value is ``V_j``
rotated back by the attended angle. Attention is thereby learned clustering (which images show
the same view) and alignment (at which rotation) at once, with learned query/key/value
projections, several heads, MLPs and residual blocks.

Memory grows linearly in the set size ``N``: images attend to each other through ``classes``
latent tokens (induced-set attention). Each layer first lets the class tokens attend to all
images (so each becomes a rotation-aligned, learned average of the images it claims: a class
average), then every image attends to the class tokens and reads back what they hold, in its own
frame. The cost per layer is ``O(N * classes * T)`` for ``T`` angle samples.

The readout is a clean, CTF-free projection spectrum per image in its frame; it is multiplied by
the image's own CTF (the target is the clean, CTF-affected image), brought back onto the
Cartesian grid and restricted to a learned radial support. Inputs are in units of the noise
standard deviation, so the network sees the SNR; the CTF enters as the sign-corrected spectrum
``c x`` and the CTF power ``c^2``. Any set size works at inference, including one image.

With ``guide="cwf"`` the covariance Wiener filter's estimate of each image (the best classical
linear set method, itself rotation-equivariant) is a further input channel and is added to the
output with a learned weight per ring: the network starts from the linear estimate and its
attention has to earn whatever it adds. ``guide="em"`` adds a 3D-consistent summary of the set as
well: expectation maximisation over poses and shifts builds a map from the set, and each image's
posterior mean given that map (:mod:`cryo_lightning.abinitio.expectation_maximization`) is a
further input and skip. EM is the slow part (tens of seconds per set of 128 on a CPU core), so
training reads it from a cache (``cryol cache-guides``, passed as the ``guide`` input); at
inference the model runs it with the settings it was trained with (``em_*``).

Equivariance holds by construction for rotations by multiples of ``360 / T`` degrees and, up to
polar interpolation, for any angle; permutation equivariance over the set holds exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cryo_lightning.abinitio.expectation_maximization import expectation_maximization
from cryo_lightning.denoise.cwf import cwf_denoise
from cryo_lightning.physics.fourier import radial_grid
from cryo_lightning.physics.noise import estimate_noise_variance
from cryo_lightning.physics.polar import PolarSpectrum

__all__ = ["RotationalSetTransformer"]


class _FrequencyLinear(nn.Module):
    """A complex linear map over channels for each angular frequency: ``(..., M, C_in) -> (..., M, C_out)``.

    Commutes with in-plane rotations (which multiply frequency ``m`` by a phase) by construction.
    The weights vary smoothly with ``m``: they are interpolated (linearly in ``log(1 + |m|)``) between
    ``knots`` learned matrices at ``|m| = 0, 1, 2, 4, ...``, so neighbouring frequencies, which see
    similar structure, share what they learn, and the parameter count does not grow with ``M``.
    """

    def __init__(self, n_freq: int, c_in: int, c_out: int) -> None:
        super().__init__()
        m = torch.fft.fftfreq(n_freq, 1.0 / n_freq).abs()  # |m| of FFT bin k
        knots = torch.tensor([0.0] + [2.0**k for k in range(int(math.log2(max(n_freq // 2, 1))) + 1)])
        position = torch.log1p(m)
        grid = torch.log1p(knots)
        right = torch.searchsorted(grid, position).clamp(1, len(grid) - 1)
        frac = ((position - grid[right - 1]) / (grid[right] - grid[right - 1])).clamp(0, 1)
        interp = torch.zeros(n_freq, len(grid))
        interp[torch.arange(n_freq), right - 1] = 1 - frac
        interp[torch.arange(n_freq), right] += frac
        self.register_buffer("interp", interp, persistent=False)  # (M, knots)
        scale = 1.0 / math.sqrt(2 * c_in)
        self.weight = nn.Parameter(torch.randn(len(grid), c_in, c_out, 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Interpolating the weights first and applying one (C_in x C_out) matrix per frequency
        # measured 2.5x faster on CPU than one large product over the knots' stacked inputs.
        w = torch.einsum("mk,kio->mio", self.interp.to(x.dtype), torch.view_as_complex(self.weight))
        return torch.einsum("...mi,mio->...mo", x, w)


class _RMSNorm(nn.Module):
    """Divide a token by the root mean square of its coefficients (rotation-invariant), then a
    learned real gain per (frequency, channel)."""

    def __init__(self, n_freq: int, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(n_freq, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.abs().square().mean((-1, -2), keepdim=True).add(1e-8).sqrt()
        return x / rms * self.gain


class _GatedMLP(nn.Module):
    """Frequency-wise linear -> norm gate (``h * sigmoid(|h| + b)``, rotation-equivariant) -> linear."""

    def __init__(self, n_freq: int, channels: int, hidden: int) -> None:
        super().__init__()
        self.up = _FrequencyLinear(n_freq, channels, hidden)
        self.bias = nn.Parameter(torch.zeros(n_freq, hidden))
        self.down = _FrequencyLinear(n_freq, hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        return self.down(h * torch.sigmoid(h.abs() + self.bias))


class _RotationalAttention(nn.Module):
    """Multi-head attention of query tokens over (key token, in-plane rotation) pairs.

    Tokens are ``(B, n, M, D)`` complex with ``M`` angular frequencies (an FFT over ``T = M``
    angles). Returns ``(B, n_q, M, D)`` and the attention ``(B, H, n_q, n_k, T)`` if asked.
    """

    def __init__(self, n_freq: int, channels: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q = _FrequencyLinear(n_freq, channels, heads * head_dim)
        self.k = _FrequencyLinear(n_freq, channels, heads * head_dim)
        self.v = _FrequencyLinear(n_freq, channels, heads * head_dim)
        self.out = _FrequencyLinear(n_freq, heads * head_dim, channels)
        # logits of unit-RMS tokens are sums of M * head_dim products
        self.log_scale = nn.Parameter(torch.full((heads,), -0.5 * math.log(n_freq * head_dim)))

    def forward(self, queries: torch.Tensor, keys: torch.Tensor,
                return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, nq, M, _ = queries.shape
        nk, H, d = keys.shape[1], self.heads, self.head_dim

        def heads(x: torch.Tensor, n: int) -> torch.Tensor:  # (B, n, M, H d) -> (B, H, M, n, d)
            return x.reshape(B, n, M, H, d).permute(0, 3, 2, 1, 4)

        q, k, v = heads(self.q(queries), nq), heads(self.k(keys), nk), heads(self.v(keys), nk)
        cross = q @ k.transpose(-1, -2).conj()  # (B, H, M, nq, nk)
        # logit(delta) = Re sum_m Q conj(K) exp(i m delta): an inverse FFT over m, times M
        logits = torch.fft.ifft(cross, dim=2).real * M * self.log_scale.exp()[None, :, None, None, None]
        logits = logits.permute(0, 1, 3, 4, 2)  # (B, H, nq, nk, T)
        attn = torch.softmax(logits.flatten(-2), dim=-1).reshape(logits.shape)  # over (j, delta)
        # sum_delta a(delta) exp(-i m delta) rotates each value back by the attended angle
        weights = torch.fft.fft(attn, dim=-1).permute(0, 1, 4, 2, 3)  # (B, H, M, nq, nk)
        out = (weights @ v).permute(0, 3, 2, 1, 4).reshape(B, nq, M, H * d)
        return self.out(out), (attn if return_attention else None)


class _Block(nn.Module):
    """Class tokens gather from the images, then the images read from the class tokens; each with
    a residual connection and a gated MLP (pre-normalised)."""

    def __init__(self, n_freq: int, channels: int, heads: int, head_dim: int, hidden: int) -> None:
        super().__init__()
        self.norm_c, self.norm_x1 = _RMSNorm(n_freq, channels), _RMSNorm(n_freq, channels)
        self.gather = _RotationalAttention(n_freq, channels, heads, head_dim)
        self.mlp_c, self.norm_c2 = _GatedMLP(n_freq, channels, hidden), _RMSNorm(n_freq, channels)
        self.norm_x2, self.norm_c3 = _RMSNorm(n_freq, channels), _RMSNorm(n_freq, channels)
        self.read = _RotationalAttention(n_freq, channels, heads, head_dim)
        self.mlp_x, self.norm_x3 = _GatedMLP(n_freq, channels, hidden), _RMSNorm(n_freq, channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor, return_attention: bool = False):
        """Updated images and classes; with ``return_attention`` also the (gather, read) attentions."""
        gathered, gather = self.gather(self.norm_c(c), self.norm_x1(x), return_attention)
        c = c + gathered
        c = c + self.mlp_c(self.norm_c2(c))
        read, attn = self.read(self.norm_x2(x), self.norm_c3(c), return_attention)
        x = x + read
        x = x + self.mlp_x(self.norm_x3(x))
        return x, c, ((gather, attn) if return_attention else None)


class RotationalSetTransformer(nn.Module):
    """Set denoiser with learned rotational attention through latent class tokens.

    Args:
        L: image size (pixels).
        n_radii: polar radii ``R`` from 0 to Nyquist (default ``L // 2 + 1``).
        n_angles: polar angles ``T`` = angular frequencies (default ``2 L`` rounded up to a multiple
            of 4, so that quarter turns are exact shifts).
        channels: feature channels ``D`` per angular frequency.
        heads: attention heads.
        head_dim: channels per head.
        layers: blocks (each: classes gather from images, images read from classes, MLPs).
        classes: latent class tokens (memory and time grow as ``N * classes``).
        hidden: MLP width per angular frequency.
        guide: ``"cwf"`` adds the covariance Wiener filter's estimate of each image (a classical,
            rotation-equivariant set method) as a further input and to the output with a learned
            weight per ring, so training starts from the best linear estimate and learns what it
            misses; ``"em"``: the CWF's and EM's posterior-mean estimates (a 3D-consistent set
            method) both; ``"none"``: the network alone.
        em_iterations, em_rotations, em_max_shift: the EM guide's settings (iterations, rotation
            grid size, largest shift searched in pixels); a cache of guides must be built with
            the same ones (``cryol cache-guides`` reads them from the model's config).
    """

    GUIDES = ("none", "cwf", "em")

    def __init__(self, L: int = 32, n_radii: int | None = None, n_angles: int | None = None, channels: int = 32,
                 heads: int = 4, head_dim: int = 16, layers: int = 3, classes: int = 32, hidden: int = 64,
                 guide: str = "none", em_iterations: int = 8, em_rotations: int = 4608,
                 em_max_shift: float = 3.0) -> None:
        super().__init__()
        if guide not in self.GUIDES:
            raise ValueError(f"guide must be one of {self.GUIDES}, got {guide!r}")
        n_radii = n_radii or L // 2 + 1
        n_angles = n_angles or 4 * math.ceil(L / 2)
        if n_angles % 4:
            raise ValueError(f"n_angles must be a multiple of 4 (quarter turns exact), got {n_angles}")
        if min(channels, heads, head_dim, layers, classes, hidden) < 1:
            raise ValueError("channels, heads, head_dim, layers, classes and hidden must all be >= 1")
        self.L, self.R, self.T, self.guide = L, n_radii, n_angles, guide
        self.polar = PolarSpectrum(L, n_radii, n_angles)
        self.em_settings = {"iterations": em_iterations, "n_rotations": em_rotations, "max_shift": em_max_shift}
        self.embed = _FrequencyLinear(n_angles, (3 + self.GUIDES.index(guide)) * n_radii, channels)
        # skips start at sigmoid(0) = 0.5 of the CWF alone, or EM (0.98) beside little CWF (0.05): on the
        # validation sets of configs/denoise_em_transformer_cpu.yaml, 0.88 EM measured 0.456 against 0.444 for EM
        self.guide_weight = (nn.Parameter(torch.full((n_radii,), -3.0 if guide == "em" else 0.0))
                             if guide != "none" else None)
        self.em_weight = nn.Parameter(torch.full((n_radii,), 4.0)) if guide == "em" else None
        self.class_tokens = nn.Parameter(torch.randn(classes, n_angles, channels, 2) / math.sqrt(2))
        self.blocks = nn.ModuleList(_Block(n_angles, channels, heads, head_dim, hidden) for _ in range(layers))
        self.norm_out = _RMSNorm(n_angles, channels)
        self.readout = _FrequencyLinear(n_angles, channels, n_radii)
        if guide == "em":  # start from the guides' skip alone: the network adds what it earns
            nn.init.zeros_(self.readout.weight)
        # The Nyquist ring is sampled asymmetrically (its +x half lies beyond the padded spectrum),
        # so it would break rotation equivariance: it is left out of inputs and outputs.
        self.register_buffer("_rings", (torch.arange(n_radii) < n_radii - 1).float()[:, None], persistent=False)
        radii = torch.arange(L // 2 + 2, dtype=torch.float32)
        self.support_logits = nn.Parameter((0.45 * L - radii) / 1.5)  # soft disk, learned
        self.register_buffer("_radius", radial_grid(L, 2).clamp_max(L // 2 + 1), persistent=False)

    @torch.no_grad()
    def em_guide(self, noisy: torch.Tensor, ctf: torch.Tensor | None = None,
                 noise_variance: torch.Tensor | None = None) -> torch.Tensor:
        """EM's posterior mean of every image ``(B, N, L, L)`` with this model's settings (zeros for
        sets of one image, which make no map); what ``cryol cache-guides`` stores for training."""
        if noisy.shape[1] < 2:
            return torch.zeros_like(noisy)
        found = expectation_maximization(noisy.float(), None if ctf is None else ctf.float(),
                                         None if noise_variance is None else noise_variance.float(),
                                         generator=torch.Generator().manual_seed(0), **self.em_settings)
        return found.denoised.to(noisy.dtype)

    def tokens(self, noisy: torch.Tensor, ctf: torch.Tensor | None, noise_variance: torch.Tensor | None,
               use_guide: bool = True, em: torch.Tensor | None = None):
        """Steerable input tokens ``(B, N, T, D)``, polar CTFs ``(B, N, R, T)``, noise std ``(B,)``
        and the guides' polar spectra ``[(B, N, R, T)]`` in noise units (empty without a guide).
        ``use_guide=False`` leaves the guides' inputs at zero (images taken one by one); ``em`` is
        the EM guide ``(B, N, L, L)`` if already computed (e.g. cached)."""
        if ctf is None:
            ctf = torch.ones_like(noisy)
        if noise_variance is None:
            noise_variance = estimate_noise_variance(noisy).mean(-1)
        sigma = noise_variance.float().clamp_min(1e-12).sqrt()
        L = self.L
        # Polar spectra in units of the noise std of one Fourier coefficient (sigma * L).
        scale = sigma[:, None, None, None]
        spec = self.polar(noisy.float() / scale) / L * self._rings
        c = self.polar.sample_ctf(ctf.float()) * self._rings
        inputs = [c * spec, spec, (c * c).to(spec.dtype)]
        guides = []
        if self.guide != "none" and use_guide:
            with torch.no_grad():
                estimates = [cwf_denoise(noisy.float(), ctf.float(), noise_variance.float())]
                if self.guide == "em":
                    estimates.append(em if em is not None else self.em_guide(noisy, ctf, noise_variance))
            guides = [self.polar(e.float() / scale) / L * self._rings for e in estimates]
            inputs.extend(guides)
        elif self.guide != "none":
            inputs.extend(torch.zeros_like(spec) for _ in range(self.GUIDES.index(self.guide)))
        angular = torch.fft.fft(torch.cat(inputs, dim=2), dim=-1) / math.sqrt(self.T)  # frequency m of the angle
        return self.embed(angular.transpose(-1, -2)), c, sigma, guides

    def forward(self, noisy: torch.Tensor, ctf: torch.Tensor | None = None,
                noise_variance: torch.Tensor | None = None, guide: torch.Tensor | None = None,
                return_attention: bool = False):
        """Denoise sets.

        Args:
            noisy: ``(B, N, L, L)`` images (any units).
            ctf: ``(B, N, L, L)`` centred CTF of each image, or None (no CTF).
            noise_variance: ``(B,)`` white-noise variance per set; None: estimated from the
                corners outside the inscribed disk.
            guide: ``(B, N, L, L)`` the EM guide if already computed (``guide="em"``; cached for
                training); None computes it.
            return_attention: also return each layer's image-to-class attention
                ``(B, H, N, classes, T)``.
        Returns:
            ``(B, N, L, L)`` estimates of the clean, CTF-affected images (and the attentions).
        """
        B, N, L, _ = noisy.shape
        x, c, sigma, guides = self.tokens(noisy, ctf, noise_variance, em=guide)
        classes = torch.view_as_complex(self.class_tokens)[None].expand(B, -1, -1, -1)
        attentions = []
        for block in self.blocks:
            x, classes, attn = block(x, classes, return_attention)
            attentions.append(None if attn is None else attn[1])
        clean = self.readout(self.norm_out(x)).transpose(-1, -2)  # (B, N, R, T) angular frequencies
        polar = torch.fft.ifft(clean, dim=-1) * math.sqrt(self.T)  # CTF-free projection spectrum
        # The origin is one point: its ring holds one value (angular frequency 0), or the
        # Cartesian resampling would pick the angle-0 sample and break rotation equivariance.
        origin = polar[..., :1, :].mean(-1, keepdim=True).expand_as(polar[..., :1, :])
        polar = torch.cat([origin, polar[..., 1:, :]], dim=-2)
        estimate = c * polar
        for weight, found in zip((self.guide_weight, self.em_weight), guides):
            estimate = estimate + torch.sigmoid(weight)[:, None] * found
        out = self.polar.inverse(estimate) * L * self.support() * sigma[:, None, None, None]
        return (out, attentions) if return_attention else out

    def support(self) -> torch.Tensor:
        """The learned support ``(L, L)`` in [0, 1]: a radial profile, linearly interpolated."""
        profile = torch.sigmoid(self.support_logits)
        lo = self._radius.floor().long().clamp_max(len(profile) - 2)
        frac = self._radius - lo
        return profile[lo] * (1 - frac) + profile[lo + 1] * frac

    @torch.no_grad()
    def embedding(self, images: torch.Tensor, ctf: torch.Tensor | None = None,
                  noise_variance: torch.Tensor | None = None) -> torch.Tensor:
        """A learned, rotation-invariant embedding of single images, for grouping them into sets.

        Each image's attention over the *initial* class tokens in the first layer (summed over
        rotations: which learned views it resembles, at whatever angle), per head, square-rooted
        and L2-normalised so that dot products compare distributions. It needs no set, so
        embeddings of different batches are comparable.

        Args:
            images: ``(n, L, L)``; ctf: ``(n, L, L)`` or None; noise_variance: ``()`` or None
                (estimated from the corners).
        Returns:
            ``(n, heads * classes)``.
        """
        variance = None if noise_variance is None else torch.as_tensor(noise_variance).reshape(1)
        x = self.tokens(images[None], None if ctf is None else ctf[None], variance, use_guide=False)[0]
        block = self.blocks[0]
        classes = torch.view_as_complex(self.class_tokens)[None]
        _, attn = block.read(block.norm_x2(x), block.norm_c3(classes), return_attention=True)
        features = attn[0].sum(-1).permute(1, 0, 2).flatten(1).clamp_min(0).sqrt()  # (n, H * classes)
        return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def neighbour_weights(self, noisy: torch.Tensor, ctf: torch.Tensor | None = None,
                          noise_variance: torch.Tensor | None = None, layer: int = 0) -> torch.Tensor:
        """How much each image draws from every other image through the class tokens.

        Image ``i`` reads class ``k`` with weight ``b_ik`` (the last step of layer ``layer``);
        class ``k`` gathered image ``j`` with weight ``g_kj``. The product ``sum_k b_ik g_kj``,
        summed over rotations and averaged over heads, is the share of image ``j`` in image
        ``i``'s update: ``(B, N, N)``, rows sum to 1.
        """
        B, N = noisy.shape[:2]
        x = self.tokens(noisy, ctf, noise_variance)[0]
        classes = torch.view_as_complex(self.class_tokens)[None].expand(B, -1, -1, -1)
        for index, block in enumerate(self.blocks):
            if index == layer:
                _, _, (gather, read) = block(x, classes, return_attention=True)
                g = gather.sum(-1).mean(1)  # (B, classes, N)
                b = read.sum(-1).mean(1)  # (B, N, classes)
                return torch.einsum("bik,bkj->bij", b, g)
            x, classes, _ = block(x, classes)
        raise ValueError(f"layer {layer} out of range for {len(self.blocks)} layers")
