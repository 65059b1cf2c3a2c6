"""Loss adapters: per-chain and per-sample losses from a user's mean loss.

A user gives ``loss_fn(output, target) -> scalar`` (the mean loss over a batch).
The engine needs per-chain losses ``(C,)`` for C parameter sets at once and,
for weighted data and for the control variate, per-sample losses.  This module
derives them without changing what the user's loss means:

* known PyTorch losses (``F.mse_loss``, ``nn.MSELoss``, ``F.cross_entropy``,
  ``nn.CrossEntropyLoss``, ``F.nll_loss``, ``F.l1_loss``,
  ``F.binary_cross_entropy_with_logits`` with mean reduction) get exact native
  per-sample versions;
* a loss may carry an attribute ``per_sample``: a callable mapping
  ``(output, target)`` with leading dims ``(..., B)`` to per-sample losses of
  shape ``(..., B)`` such that their mean is the scalar loss;
* anything else is lifted with ``torch.func.vmap``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LossAdapter", "register_per_sample"]

LossFn = Callable[[Tensor, Tensor], Tensor]
PerSample = Callable[[Tensor, Tensor], Tensor]  # (lead..., *s), (lead..., *s) -> (lead...)


def _trailing_mean(t: Tensor, lead: int) -> Tensor:
    return t.reshape(*t.shape[:lead], -1).mean(-1) if t.ndim > lead else t


def _mse(o: Tensor, t: Tensor, lead: int) -> Tensor:
    return _trailing_mean((o - t).square(), lead)


def _l1(o: Tensor, t: Tensor, lead: int) -> Tensor:
    return _trailing_mean((o - t).abs(), lead)


def _bce_logits(o: Tensor, t: Tensor, lead: int) -> Tensor:
    return _trailing_mean(F.binary_cross_entropy_with_logits(o, t, reduction="none"), lead)


def _classification(fn: Callable) -> Callable[[Tensor, Tensor, int], Tensor]:
    def per_sample(o: Tensor, t: Tensor, lead: int) -> Tensor:
        # output (lead..., K, *extra), target (lead..., *extra)
        lead_shape = o.shape[:lead]
        o2 = o.reshape(-1, *o.shape[lead:])
        t2 = t.reshape(-1, *t.shape[lead:])
        out = fn(o2, t2, reduction="none")
        return _trailing_mean(out.reshape(*lead_shape, *out.shape[1:]), lead)

    return per_sample


_KNOWN: dict[object, Callable[[Tensor, Tensor, int], Tensor]] = {
    F.mse_loss: _mse,
    F.l1_loss: _l1,
    F.binary_cross_entropy_with_logits: _bce_logits,
    F.cross_entropy: _classification(F.cross_entropy),
    F.nll_loss: _classification(F.nll_loss),
}
_KNOWN_MODULES: dict[type, Callable[[Tensor, Tensor, int], Tensor]] = {
    nn.MSELoss: _mse,
    nn.L1Loss: _l1,
    nn.BCEWithLogitsLoss: _bce_logits,
    nn.CrossEntropyLoss: _classification(F.cross_entropy),
    nn.NLLLoss: _classification(F.nll_loss),
}


def register_per_sample(loss_fn: LossFn, per_sample: PerSample) -> LossFn:
    """Declare the per-sample form of ``loss_fn`` (returns ``loss_fn``)."""
    loss_fn.per_sample = per_sample  # type: ignore[attr-defined]
    return loss_fn


def _known_per_sample(loss_fn: object) -> Callable[[Tensor, Tensor, int], Tensor] | None:
    if loss_fn in _KNOWN:  # type: ignore[operator]
        return _KNOWN[loss_fn]  # type: ignore[index]
    for cls, ps in _KNOWN_MODULES.items():
        if type(loss_fn) is cls:
            mod = loss_fn  # type: ignore[assignment]
            if getattr(mod, "reduction", "mean") != "mean":
                return None
            if getattr(mod, "weight", None) is not None:
                return None
            if getattr(mod, "label_smoothing", 0.0) or getattr(mod, "pos_weight", None) is not None:
                return None
            if getattr(mod, "ignore_index", -100) != -100:
                return None
            return ps
    return None


class LossAdapter:
    """Per-chain, per-sample and weighted evaluations of a mean loss.

    Parameters
    ----------
    loss_fn
        ``loss_fn(output, target) -> scalar``, the mean loss over a batch.
    """

    def __init__(self, loss_fn: LossFn):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self._known = _known_per_sample(loss_fn)
        self._attr: PerSample | None = getattr(loss_fn, "per_sample", None)
        self.has_native_per_sample = self._known is not None or self._attr is not None

    # ------------------------------------------------------------------
    def per_sample(self, out: Tensor, target: Tensor, lead: int) -> Tensor:
        """Per-sample losses of shape ``out.shape[:lead]``.

        ``lead`` counts the leading dims (2 for ``(C, B, ...)``, 1 for ``(B, ...)``).
        """
        if self._known is not None:
            res = self._known(out, target, lead)
        elif self._attr is not None:
            res = self._attr(out, target)
        else:
            def one(o: Tensor, t: Tensor) -> Tensor:
                return self.loss_fn(o.unsqueeze(0), t.unsqueeze(0))

            f = one
            for _ in range(lead):
                f = torch.vmap(f)
            res = f(out, target)
        if res.shape != out.shape[:lead]:
            raise ValueError(
                f"per-sample loss has shape {tuple(res.shape)}, expected {tuple(out.shape[:lead])}"
                " (one value per sample)"
            )
        return res

    def chain_loss(self, out: Tensor, target: Tensor, weights: Tensor | None) -> Tensor:
        """Per-chain mean (or weighted mean) loss: (C, B, ...) -> (C,).

        ``weights`` are (C, B) and sum to one along B.
        """
        if weights is None:
            if self.has_native_per_sample:
                return self.per_sample(out, target, 2).mean(1)
            return torch.vmap(self.loss_fn)(out, target)
        return (self.per_sample(out, target, 2) * weights).sum(1)

    def single_loss(self, out: Tensor, target: Tensor, weights: Tensor | None) -> Tensor:
        """One chain's loss: (B, ...) -> scalar (used inside ``vmap``)."""
        if weights is None:
            return self.loss_fn(out, target)
        return (self.per_sample(out, target, 1) * weights).sum()
