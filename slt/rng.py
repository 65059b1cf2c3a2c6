"""Explicit random streams of a batched run: per-checkpoint noise and minibatch indices."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .data import Data

__all__ = ["ChainRNG"]

_INDEX_STREAM_OFFSET = 0x5D588B65  # separates the index stream from the noise stream


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
        if self._noise is None or self._noise_pos >= self._noise.shape[0] or self._noise.shape[2:] != like.shape[1:]:
            d_shape = like.shape[1:]
            S = self._chunk(self.C * int(torch.Size(d_shape).numel()))
            parts = [
                torch.randn((S, self.C, *d_shape), generator=g, device=like.device, dtype=like.dtype)
                for g in self.noise_gens
            ]
            self._noise = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # no copy of one part
            self._noise_pos = 0
        out = self._noise[self._noise_pos]
        self._noise_pos += 1
        return out

    def index(self, data: Data, batch_size: int, shared: bool = False) -> Tensor:
        """(K*C, B) minibatch indices; ``shared``: the chains of a checkpoint share them."""
        if self._idx is None or self._idx_pos >= self._idx.shape[0]:
            S = self._chunk(self.C * batch_size)
            c = 1 if shared else self.C
            parts = [
                data.sample_index(S * c, batch_size, g).view(S, c, batch_size).expand(S, self.C, batch_size)
                for g in self.index_gens
            ]
            self._idx = torch.cat(parts, dim=1)
            self._idx_pos = 0
        out = self._idx[self._idx_pos]
        self._idx_pos += 1
        return out
