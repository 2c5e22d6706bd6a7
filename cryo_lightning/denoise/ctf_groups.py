"""CTF groups of a set's images, for the least-squares operator of the CWF's covariance estimate.

The normal equations of the covariance
(:func:`~cryo_lightning.denoise.block_moments.estimate_block_moments`) sum one term ``A_i C A_i``
per image, ``A_i = H_i^T H_i`` with ``H_i`` the image's CTF operator. With more than
``max_groups`` images, the images are grouped by k-means on their radial CTF profiles and ``A_i``
is replaced by its group mean in the left-hand side only (the error is second order in the spread
within a group; Bhamre et al. use defocus groups likewise).
"""

from __future__ import annotations

import torch

__all__ = ["ctf_groups"]


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
