"""Exact tier: the noise streams of ``slt.rng``.

``draw_normal`` fills a large CPU tensor a piece at a time (cache-sized ``normal_`` calls) and must
give the numbers of one ``torch.randn`` call of that shape — the property that lets a run's noise
be reproduced from its seed, and checkpoint ``k`` of a batched run see the noise of a separate run
with ``seeds[k]``.  PyTorch's CPU kernel draws uniforms in order and transforms them in groups of
16 (redrawing the last 16 when the size is not a multiple of 16), so pieces that are multiples of 16
with a last piece of at least 16 reproduce it; these tests are what would catch a PyTorch version
whose kernel does not."""

from __future__ import annotations

import pytest
import torch

from slt.rng import NOISE_PIECE, ChainRNG, draw_normal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [2 * NOISE_PIECE, 2 * NOISE_PIECE + 1, 2 * NOISE_PIECE + 15, 2 * NOISE_PIECE + 16,
                               5 * NOISE_PIECE + 7, 10**6 + 3])
def test_draw_normal_gives_the_numbers_of_one_randn_call(dtype, n):
    ref = torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=dtype)
    got = draw_normal(torch.empty(n, dtype=dtype), torch.Generator().manual_seed(7))
    assert torch.equal(got, ref)


def test_draw_normal_leaves_the_generator_where_one_call_would():
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.randn(3 * NOISE_PIECE + 5, generator=g1)
    draw_normal(torch.empty(3 * NOISE_PIECE + 5), g2)
    assert torch.equal(torch.randn(100, generator=g1), torch.randn(100, generator=g2))


@pytest.mark.parametrize("seeds", [[5], [5, 9]])
@pytest.mark.parametrize("d", [1000, 800_003])
def test_chain_noise_is_each_seeds_randn(seeds, d):
    """Per checkpoint, a run's noise is torch.randn of (S, C, d) from that checkpoint's seed, one
    (C, d) slice per step (S steps drawn at once; S = 1 for a large model, drawn in pieces)."""
    C = 3
    rng = ChainRNG(seeds, C, torch.device("cpu"))
    S = rng._chunk(C * d)
    assert (S == 1) == (d > 10**5)
    like = torch.empty(len(seeds) * C, d)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    for chunk in range(2):
        refs = [torch.randn((S, C, d), generator=g) for g in gens]
        for s in range(S):
            got = rng.owned_normal(like)
            for k, ref in enumerate(refs):
                assert torch.equal(got[k * C:(k + 1) * C], ref[s]), (chunk, s, k)
