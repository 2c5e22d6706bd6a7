"""Nearest neighbours by cosine similarity, and class centres."""

from __future__ import annotations

import torch

from cryo_lightning.abinitio.neighbors import nearest_neighbors, select_centres


def test_nearest_neighbors_matches_brute_force_and_puts_self_first():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(50, 8, generator=g)
    f[7] = f[3]  # an exact duplicate must not displace the image itself
    idx, sim = nearest_neighbors(f, 4, chunk=16)
    unit = f / f.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    assert torch.equal(idx[:, 0], torch.arange(50))
    for i in range(50):
        others = torch.cat([torch.arange(i), torch.arange(i + 1, 50)])
        expected = others[torch.argsort(cos[i, others], descending=True)[:3]]
        assert set(idx[i, 1:].tolist()) == set(expected.tolist())
        torch.testing.assert_close(sim[i], cos[i, idx[i]])
    assert int(idx[3, 1]) == 7 and int(idx[7, 1]) == 3


def test_selected_centres_do_not_belong_to_each_others_classes():
    g = torch.Generator().manual_seed(3)
    idx, sim = nearest_neighbors(torch.randn(200, 6, generator=g), 5)
    centres = select_centres(idx, sim, 12)
    assert len(set(centres.tolist())) == 12
    for a in range(12):
        for b in range(a):
            assert int(centres[a]) not in idx[centres[b]].tolist()
