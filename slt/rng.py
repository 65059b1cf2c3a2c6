"""Explicit random streams of a batched run: per-checkpoint noise and minibatch indices."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .data import Data

__all__ = ["ChainRNG", "draw_normal"]

_INDEX_STREAM_OFFSET = 0x5D588B65  # separates the index stream from the noise stream


#: elements per ``normal_`` call of :func:`draw_normal` on CPU (256 KiB of float32)
NOISE_PIECE = 1 << 16


def draw_normal(out: Tensor, generator: torch.Generator) -> Tensor:
    """Fill the contiguous ``out`` with standard normals from ``generator`` and return it: the
    numbers of ``torch.randn(out.shape, generator=generator)``.

    On CPU the tensor is drawn a cache-sized piece (:data:`NOISE_PIECE` elements) at a time.
    PyTorch's CPU kernel writes a uniform per element in order and then transforms them in place
    in groups of 16 (Box–Muller; for a size that is not a multiple of 16 it redraws the last 16),
    so over a parameter-sized tensor (33 MB for 8 chains of 1M parameters) its second pass reads
    back from memory what the first wrote; pieces whose sizes are multiples of 16, the last one at
    least 16 long, give the same numbers (checked for float32, float64 and bfloat16 in
    ``tests/test_rng.py``) with both passes in cache: 8 chains of a 1M-parameter MLP, one thread,
    33 → 24 ms per step inside a run (the gradient takes 88 ms).  Other devices: one call (their
    generators count offsets per call)."""
    n = out.numel()
    if out.device.type != "cpu" or n < 2 * NOISE_PIECE:
        return out.normal_(generator=generator)
    flat = out.view(-1)
    starts = list(range(0, n, NOISE_PIECE))
    if n - starts[-1] < 16:
        starts.pop()
    for a, b in zip(starts, starts[1:] + [n]):
        flat[a:b].normal_(generator=generator)
    return out


class ChainRNG:
    """One noise stream and one minibatch-index stream per checkpoint.

    Checkpoint ``k`` draws from generators seeded with ``seeds[k]``, in chunks
    whose size depends only on the per-checkpoint shape, so checkpoint ``k`` of
    a batched call sees exactly the random numbers of a separate call with
    ``seed=seeds[k]``.
    """

    def __init__(self, seeds: Sequence[int], chains: int, device: torch.device):
        self.seeds = [int(s) for s in seeds]
        self.C = chains
        self.device = device
        self.noise_gens = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        self.index_gens = [
            torch.Generator(device=device).manual_seed((s + _INDEX_STREAM_OFFSET) % 2**63)
            for s in self.seeds
        ]
        self._noise: Tensor | None = None
        self._noise_pos = 0
        self._idx: Tensor | None = None
        self._idx_pos = 0

    @staticmethod
    def _chunk(per_stream: int) -> int:
        return max(1, min(64, (1 << 21) // max(per_stream, 1)))

    def normal(self, like: Tensor) -> Tensor:
        """Standard normal noise shaped like ``like`` ((K*C, d))."""
        return self.owned_normal(like)

    def owned_normal(self, like: Tensor) -> Tensor:
        """:meth:`normal`, and a promise: the returned slice of the pre-drawn chunk is never
        handed out again and, once the chunk is used up, this object holds no reference to it, so
        the caller owns it (a sampler may build its update in it, :func:`slt.samplers.base.owned_normal`).

        The chunk of ``S`` draws per stream is drawn straight into one ``(S, K*C, ...)`` buffer
        (no per-checkpoint parts and concatenation): for large models ``S = 1`` and a step's noise
        is one parameter-sized tensor, alive only while the caller holds it."""
        if self._noise is None or self._noise_pos >= self._noise.shape[0] or self._noise.shape[2:] != like.shape[1:]:
            d_shape = like.shape[1:]
            S = self._chunk(self.C * int(torch.Size(d_shape).numel()))
            self._noise = None  # the used-up chunk is not held while the next one is drawn
            if len(self.noise_gens) == 1:
                buf = draw_normal(torch.empty((S, self.C, *d_shape), device=like.device, dtype=like.dtype),
                                  self.noise_gens[0])
            else:
                buf = torch.empty((S, self.C * len(self.noise_gens), *d_shape), device=like.device, dtype=like.dtype)
                for k, g in enumerate(self.noise_gens):
                    part = buf[:, k * self.C:(k + 1) * self.C]
                    if S == 1:  # a contiguous slice: drawn in place, the numbers of torch.randn
                        draw_normal(part, g)
                    else:
                        part.copy_(torch.randn((S, self.C, *d_shape), generator=g, device=like.device,
                                               dtype=like.dtype))
            self._noise = buf
            self._noise_pos = 0
        out = self._noise[self._noise_pos]
        self._noise_pos += 1
        if self._noise_pos >= self._noise.shape[0]:
            self._noise = None  # used up: the caller's slice is the only reference left
        return out

    def index(self, data: Data | Sequence[Data], batch_size: int, shared: bool = False) -> Tensor:
        """(K*C, B) minibatch indices; ``shared``: the chains of a checkpoint share them.  ``data``
        may be one dataset per stream (indices into each stream's own dataset)."""
        if self._idx is None or self._idx_pos >= self._idx.shape[0]:
            S = self._chunk(self.C * batch_size)
            c = 1 if shared else self.C
            datas = data if isinstance(data, Sequence) else [data] * len(self.index_gens)
            parts = [
                dk.sample_index(S * c, batch_size, g).view(S, c, batch_size).expand(S, self.C, batch_size)
                for dk, g in zip(datas, self.index_gens)
            ]
            self._idx = torch.cat(parts, dim=1)
            self._idx_pos = 0
        out = self._idx[self._idx_pos]
        self._idx_pos += 1
        return out
