"""Base class for models written natively with a leading chain dimension.

A :class:`ChainModule` is an ordinary :class:`torch.nn.Module` (it can be trained,
saved and called on a batch as usual) that can also evaluate many parameter
settings at once.  The LLC engine detects :meth:`ChainModule.forward_chains` and
uses it instead of ``torch.func.vmap`` (the "native" path), which is several
times faster for tiny models where per-operator overhead dominates.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

__all__ = ["ChainModule"]


class ChainModule(nn.Module):
    """An ``nn.Module`` whose forward pass can run C parameter sets in one call.

    Subclasses implement :meth:`forward_chains`.  ``forward(x)`` (one model, the
    module's own parameters) is derived from it, so the two can never disagree.

    Notes
    -----
    Parameter names in ``params`` are those of :meth:`named_parameters`; each
    entry carries a leading chain dimension: ``params[name].shape ==
    (C, *param.shape)``.  Inputs always carry the chain dimension too
    (``x.shape == (C, B, ...)``); the engine expands a shared batch with
    :meth:`torch.Tensor.expand` (no copy).
    """

    def forward_chains(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Evaluate C models at once.

        Parameters
        ----------
        params
            ``name -> (C, *shape)`` tensors, one parameter set per chain.
        x
            ``(C, B, ...)`` inputs, batch ``c`` is fed to parameter set ``c``.

        Returns
        -------
        Tensor
            ``(C, B, ...)`` outputs.
        """
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:  # (B, ...) -> (B, ...)
        params = {name: p.unsqueeze(0) for name, p in self.named_parameters()}
        return self.forward_chains(params, x.unsqueeze(0)).squeeze(0)
