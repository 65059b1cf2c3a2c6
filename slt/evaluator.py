r"""Batched loss evaluation: per-chain losses and gradients of ``C`` parameter vectors at once.

Three computation paths (:func:`choose_path`):

``native``
    the model is a :class:`slt.models.ChainModule` with ``forward_chains``
    (fastest for tiny models; with ``loss_and_grad_chains`` it also skips autograd);
``vmap``
    ``torch.func.functional_call`` lifted over chains with ``torch.func.vmap``
    (any module vmap supports);
``loop``
    a Python loop over chains (modules vmap cannot handle, e.g. BatchNorm in
    training mode).
"""

from __future__ import annotations

from torch import Tensor, nn
import torch

from .data import Batch, Data, LoaderSource
from .losses import LossAdapter
from .params import ParamSpec

__all__ = ["ChainEvaluator", "choose_path", "PATH_REASONS", "validate_model_and_loss", "probe_batch", "to_device"]

#: why each path was chosen, as reported in ``diagnostics["path_reason"]``
PATH_REASONS = {"native": "model defines forward_chains", "vmap": "torch.func.vmap over functional_call",
                "loop": "requested"}


def choose_path(model: nn.Module, vectorize: str) -> str:
    """``"auto"`` -> ``"native"`` when the model has ``forward_chains``, else ``"vmap"``."""
    if vectorize not in ("auto", "native", "vmap", "loop"):
        raise ValueError(f"vectorize must be 'auto', 'native', 'vmap' or 'loop', got {vectorize!r}")
    if vectorize != "auto":
        return vectorize
    return "native" if hasattr(model, "forward_chains") else "vmap"


class ChainEvaluator:
    """Per-chain losses and gradients of C parameter vectors in one computation.

    Parameters
    ----------
    model
        The module (only its structure, buffers and frozen parameters are used).
    spec
        Which parameters are sampled.
    adapter
        The loss.
    path
        ``"native"``, ``"vmap"`` or ``"loop"``.
    """

    def __init__(self, model: nn.Module, spec: ParamSpec, adapter: LossAdapter, path: str):
        if path not in ("native", "vmap", "loop"):
            raise ValueError(f"unknown vectorization path {path!r}")
        if path == "native" and not hasattr(model, "forward_chains"):
            raise ValueError("vectorize='native' needs a model with forward_chains (slt.models.ChainModule)")
        self.model = model
        self.spec = spec
        self.adapter = adapter
        self.path = path
        # hand-written per-chain gradients (tiny toy models): skips autograd entirely
        self.analytic = (
            path == "native"
            and hasattr(model, "supports_analytic_grad")
            and bool(model.supports_analytic_grad(adapter.loss_fn))
        )
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        # functional_call may update buffers in place (BatchNorm running stats in
        # training mode): work on private copies so the user's module is never modified.
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def outputs(self, flat: Tensor, x: Tensor, shared: bool = False) -> Tensor:
        """(C, d), (C, B, ...) -> (C, B, ...) model outputs; with ``shared`` the
        input is one (B, ...) batch for all chains."""
        from torch.func import functional_call

        C = flat.shape[0]
        if shared and self.path != "vmap":
            x = x.unsqueeze(0).expand(C, *x.shape)
        if self.path == "native":
            params = self.spec.unflatten(flat)
            for n, p in self.frozen.items():
                params[n] = p.unsqueeze(0).expand(C, *p.shape)
            return self.model.forward_chains(params, x)
        if self.path == "vmap":
            buffers = self.buffers

            def one(p: Tensor, xb: Tensor) -> Tensor:
                return functional_call(self.model, {**self.spec.unflatten(p), **buffers}, (xb,))

            return torch.vmap(one, in_dims=(0, None if shared else 0))(flat, x)
        outs = []
        for c in range(C):
            params = {**self.spec.unflatten(flat[c]), **self.buffers}
            outs.append(functional_call(self.model, params, (x[c],)))
        return torch.stack(outs)

    def losses(self, flat: Tensor, batch: Batch) -> Tensor:
        """(C, d) -> (C,) minibatch losses (weighted when the batch carries weights)."""
        from torch.func import functional_call

        C = flat.shape[0]
        if self.path == "native":
            b = batch.per_chain(C)
            out = self.outputs(flat, b.x)
            return self.adapter.chain_loss(out, b.y, b.weights)
        if self.path == "vmap":
            buffers = self.buffers

            def one(p: Tensor, xb: Tensor, yb: Tensor, wb: Tensor | None) -> Tensor:
                out = functional_call(self.model, {**self.spec.unflatten(p), **buffers}, (xb,))
                return self.adapter.single_loss(out, yb, wb)

            bd = None if batch.shared else 0  # a shared batch is broadcast, not copied
            in_dims = (0, bd, bd, bd if batch.weights is not None else None)
            return torch.vmap(one, in_dims=in_dims)(flat, batch.x, batch.y, batch.weights)
        res = []
        for c in range(C):
            params = {**self.spec.unflatten(flat[c]), **self.buffers}
            if batch.shared:
                xc, yc, wc = batch.x, batch.y, batch.weights
            else:
                xc, yc = batch.x[c], batch.y[c]
                wc = None if batch.weights is None else batch.weights[c]
            out = functional_call(self.model, params, (xc,))
            res.append(self.adapter.single_loss(out, yc, wc))
        return torch.stack(res)

    def loss_and_grad(self, flat: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(C, d) -> ((C,) losses, (C, d) gradients); chains are independent, so the
        gradient of the summed loss is the per-chain gradient."""
        if self.analytic:
            C = flat.shape[0]
            b = batch.per_chain(C)
            params = self.spec.unflatten(flat)
            for n, p in self.frozen.items():
                params[n] = p.unsqueeze(0).expand(C, *p.shape)
            with torch.no_grad():
                losses, grads = self.model.loss_and_grad_chains(params, b.x, b.y, b.weights, self.adapter.loss_fn)
            grad = torch.cat([grads[n].reshape(C, -1) for n in self.spec.names], dim=1)
            return losses, grad
        with torch.enable_grad():
            p = flat.detach().requires_grad_(True)
            losses = self.losses(p, batch)
            (grad,) = torch.autograd.grad(losses.sum(), p)
        return losses.detach(), grad

    def per_sample(self, flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """(K, d), (n, ...), (n, ...) -> (K, n) per-sample losses, no grad."""
        K = flat.shape[0]
        with torch.no_grad():
            out = self.outputs(flat, x, shared=True)
            return self.adapter.per_sample(out, y.unsqueeze(0).expand(K, *y.shape), 2)


def to_device(t: Tensor, device, dtype) -> Tensor:
    """Floating tensors to ``device`` and ``dtype``; others (labels) to ``device`` only."""
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)


def probe_batch(source: Data | LoaderSource, size: int, device, dtype) -> Batch:
    """The first ``size`` samples of a dataset (unweighted), or the next batch of a loader."""
    if isinstance(source, Data):
        m = min(size, source.n)
        sub = Data(source.x[:m], None if source.y is None else source.y[:m], None)
        return sub.full_batch()
    x, y, w = source.next_batch()
    x = to_device(x, device, dtype)
    y = x if y is None else to_device(y, device, dtype)
    return Batch(x, y, None, True)


def validate_model_and_loss(model: nn.Module, adapter: LossAdapter, probe: Batch) -> None:
    """Run the model and the loss once on a couple of samples; fail clearly."""
    x = probe.x[:2]
    y = probe.y[:2]
    from torch.func import functional_call

    buffers = {n: b.clone() for n, b in model.named_buffers()}  # never touch the user's buffers
    try:
        with torch.no_grad():
            out = functional_call(model, buffers, (x,))
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"the model failed on a batch of the data (x of shape {tuple(x.shape)}): {e}"
        ) from e
    try:
        loss = adapter.loss_fn(out, y)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"loss_fn failed on model output of shape {tuple(out.shape)} and target of shape "
            f"{tuple(y.shape)}: {e}"
        ) from e
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar (0-d tensor, the mean loss over the batch); got {shape}"
        )
    if adapter.has_native_per_sample:
        ps = adapter.per_sample(out, y, 1)
        if not torch.allclose(ps.mean(), loss, rtol=1e-4, atol=1e-6):
            raise ValueError(
                "the per-sample form of loss_fn does not average to loss_fn: "
                f"{float(ps.mean()):.6g} vs {float(loss):.6g}"
            )
