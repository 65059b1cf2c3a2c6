"""Base class for models written natively with a leading chain dimension.

A :class:`ChainModule` is an ordinary :class:`torch.nn.Module` (it can be trained,
saved and called on a batch as usual) that can also evaluate many parameter
settings at once.  The LLC engine detects :meth:`ChainModule.forward_chains` and
uses it instead of ``torch.func.vmap`` (the "native" path), which is several
times faster for tiny models where per-operator overhead dominates.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

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

    def supports_analytic_grad(self, loss_fn: Callable[..., Any]) -> bool:
        """Whether :meth:`loss_and_grad_chains` handles ``loss_fn`` (default: no).

        A model that returns ``True`` promises that :meth:`loss_and_grad_chains`
        returns exactly the loss ``loss_fn`` defines and its gradient; the engine
        then skips autograd (a large saving for tiny models, where graph
        bookkeeping costs more than the arithmetic).
        """
        return False

    def loss_and_grad_chains(
        self,
        params: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        weights: Tensor | None,
        loss_fn: Callable[..., Any],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-chain loss and its gradient, written by hand.

        Parameters
        ----------
        params
            ``name -> (C, *shape)``.
        x, y
            ``(C, B, ...)`` inputs and targets.
        weights
            ``(C, B)`` sample weights summing to one along ``B``, or ``None``
            (plain mean).
        loss_fn
            The user's loss; only called when :meth:`supports_analytic_grad`
            returned ``True`` for it.

        Returns
        -------
        tuple
            ``(C,)`` losses and ``name -> (C, *shape)`` gradients of each chain's
            loss with respect to its own parameters.
        """
        raise NotImplementedError(f"{type(self).__name__} has no analytic gradient")

    def forward(self, x: Tensor) -> Tensor:  # (B, ...) -> (B, ...)
        params = {name: p.unsqueeze(0) for name, p in self.named_parameters()}
        return self.forward_chains(params, x.unsqueeze(0)).squeeze(0)
