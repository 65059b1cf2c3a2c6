"""Training a model to a minimum of its empirical loss (the point :math:`w^*`).

The LLC estimator :math:`\\hat\\lambda = n\\beta(E[L_n(w)] - L_n(w^*))` (Lau et al.
2025, arXiv 2308.12108) assumes that :math:`w^*` is a local minimum of the
*empirical* loss :math:`L_n`, the very function the sampler explores.  If it is
not, chains drift to lower loss, :math:`\\hat\\lambda` is biased low and can turn
negative.  :func:`train` therefore runs an ordinary optimiser (Adam, SGD or
L-BFGS, full batch or minibatches) and then a full-batch L-BFGS *finishing
phase* on :math:`L_n` itself, and reports the final full-batch gradient norm.

Per-sample weights :math:`a_i \\ge 0` (a weighted :class:`slt.Data`, e.g. the
output of :func:`slt.symmetry.symmetrize`, :func:`~slt.symmetry.break_symmetry`
or :func:`~slt.symmetry.mix`, or ``weights=``) make :math:`L_n` the weighted
mean :math:`\\sum_i a_i \\ell_i(w) / \\sum_i a_i`, the loss
:func:`slt.estimate_llc` samples for the same data.

A small gradient norm certifies a critical point, not a minimum: e.g. the
origin of :class:`slt.models.NormalCrossing` has zero gradient but is a saddle
of :math:`L_n` for most data sets.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ._checks import check_int, check_real
from typing import Any, Mapping

from .data import Data, _leaves, _map, as_source, num_rows
from .losses import LossAdapter, weighted_mean

__all__ = ["TrainResult", "train", "full_batch_loss_and_grad_norm"]

_OPTIMIZERS = ("adam", "sgd", "lbfgs")
_FINISHERS = ("lbfgs", None)


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes
    ----------
    loss
        Final full-batch empirical loss :math:`L_n(w^*)` (without weight decay;
        the weighted mean for weighted data).
    grad_norm
        Euclidean norm of :math:`\\nabla L_n(w^*)` over all trainable parameters.
    converged
        ``grad_norm < tol``.
    history
        Main phase: the training objective at every step (the minibatch loss
        when ``batch_size`` is set; includes the weight-decay penalty for
        ``optimizer="lbfgs"``).
    finish_history
        Finishing phase: the full-batch loss after each L-BFGS chunk.
    steps
        Main-phase steps taken.
    finish_iterations
        L-BFGS iterations spent in the finishing phase.
    """

    loss: float
    grad_norm: float
    converged: bool
    history: list[float] = field(default_factory=list)
    finish_history: list[float] = field(default_factory=list)
    steps: int = 0
    finish_iterations: int = 0


def _unpack(data: object) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(x, y, weights)`` of any accepted data form (weights ``None`` if unweighted)."""
    w: Tensor | None = None
    if _structured(data):  # mappings of columns (model(**batch)), NumPy arrays, datasets: as slt.Data
        try:
            data = as_source(data)
        except TypeError as err:
            raise ValueError(str(err)) from None
        if not isinstance(data, Data):
            raise ValueError("train needs the data in memory: pass tensors, a mapping of them or a Dataset, "
                             "not a DataLoader")
    if isinstance(data, Data):
        x, y, w = data.x, data.target, data.weights
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            return x, y, w
    elif isinstance(data, Tensor):
        x, y = data, data
    elif isinstance(data, (tuple, list)) and len(data) in (2, 3) and all(isinstance(t, Tensor) for t in data):
        x, y = data[0], data[1]
        w = data[2] if len(data) == 3 else None
    else:
        raise ValueError(
            "data must be a tensor X (target X itself), a pair (X, Y), a triple (X, Y, weights) "
            "or an slt.Data"
        )
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"data must have a non-empty leading sample dimension, got shape {tuple(x.shape)}")
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of samples, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    return x, y, w


def _structured(data: object) -> bool:
    """Data that is not tensors only: a mapping, NumPy arrays, a (Hugging Face) Dataset, or tuples
    holding those."""
    if isinstance(data, (Tensor, Data)):
        return False
    if isinstance(data, (tuple, list)):
        return any(not isinstance(t, Tensor) for t in data)
    return True


def _call(model: nn.Module, x: Any) -> Any:
    """``model(x)``, or ``model(**x)`` for a mapping of columns (as :func:`slt.estimate_llc` calls it)."""
    return model(**x) if isinstance(x, Mapping) else model(x)


def _device(t: Any) -> torch.device:
    return _leaves(t)[0].device  # a tensor is its own only leaf


def _check_weights(weights: object, n: int, device: torch.device) -> Tensor:
    """Validated weights normalized to sum to one, float64 on ``device``."""
    if not isinstance(weights, Tensor):
        try:
            weights = torch.as_tensor(weights, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"weights must be a 1-D tensor of length n={n}, got {type(weights).__name__}") from None
    if weights.ndim != 1 or weights.shape[0] != n:
        raise ValueError(f"weights must be a 1-D tensor of length n={n}, got shape {tuple(weights.shape)}")
    if weights.is_complex() or weights.dtype == torch.bool:
        raise ValueError(f"weights must be real numbers, got dtype {weights.dtype}")
    w = weights.detach().to(device=device, dtype=torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError("weights contain NaN or inf")
    if (w < 0).any():
        raise ValueError("weights must be non-negative; got a negative weight")
    total = w.sum()
    if not total > 0:
        raise ValueError("weights sum to zero: no sample carries any mass")
    return w / total


def _resolve_data(
    data: object, weights: object | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(x, y, normalized float64 weights or None)``; all-equal weights become ``None``."""
    x, y, w = _unpack(data)
    if weights is not None:
        if w is not None:
            raise ValueError("weights given twice: the data carry weights and weights= was passed")
        w = weights  # type: ignore[assignment]
    if w is None:
        return x, y, None
    wn = _check_weights(w, num_rows(x), _device(x))
    if bool((wn == wn[0]).all()):  # equal weights: the unweighted mean, on the unweighted path
        return x, y, None
    return x, y, wn


def _stream_batch(
    stream: Callable[[int, torch.Generator], object], batch_size: int, generator: torch.Generator,
    x: Tensor, y: Tensor,
) -> tuple[Tensor, Tensor]:
    """One fresh minibatch ``(xb, yb)`` from ``stream``, checked against the shapes of ``(x, y)``."""
    try:
        xb, yb, wb = _unpack(stream(batch_size, generator))
    except ValueError as err:
        raise ValueError(f"stream returned a bad batch: {err}") from None
    if wb is not None:  # a weighted slt.Data or an (X, Y, weights) triple: the weights would be dropped
        raise ValueError("stream returned a weighted batch: weights are not supported with stream")
    if xb.shape[0] != batch_size:
        raise ValueError(f"stream(batch_size={batch_size}, generator) returned {xb.shape[0]} samples")
    if xb.shape[1:] != x.shape[1:] or yb.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"stream batches must be shaped like data: got X {tuple(xb.shape)}, Y {tuple(yb.shape)} "
            f"against data X {tuple(x.shape)}, Y {tuple(y.shape)}"
        )
    return xb.to(device=x.device, dtype=x.dtype), yb.to(device=y.device, dtype=y.dtype)


def _objective(
    loss_fn: Callable[[Tensor, Tensor], Tensor], adapter: LossAdapter | None, weights: Tensor | None
) -> Callable[[Tensor, Tensor], Tensor]:
    """The full-batch loss: ``loss_fn`` itself, or the weighted mean of its per-sample form."""
    if weights is None:
        return loss_fn
    assert adapter is not None

    def weighted(out: Tensor, target: Tensor) -> Tensor:
        ps = adapter.per_sample(out, target, 1)
        return weighted_mean(ps, weights.to(ps.dtype), adapter.counts(target, 1, ps.dtype), 0)

    return weighted


def full_batch_loss_and_grad_norm(
    model: nn.Module,
    data: Tensor | Sequence[Tensor] | Data,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    weights: Tensor | None = None,
) -> tuple[float, float]:
    """Full-batch loss :math:`L_n(w)` and :math:`\\lVert \\nabla L_n(w) \\rVert_2` at the model's parameters.

    Parameters
    ----------
    model, data, loss_fn, weights
        As for :func:`train` (weighted data give the weighted mean loss).

    Returns
    -------
    (float, float)
        ``(loss, grad_norm)``; the model's ``.grad`` fields are not touched.
    """
    x, y, w = _resolve_data(data, weights)
    return _loss_and_grad_norm(model, x, y, _objective(loss_fn, None if w is None else LossAdapter(loss_fn), w))


def _loss_and_grad_norm(
    model: nn.Module, x: Tensor, y: Tensor, objective: Callable[[Tensor, Tensor], Tensor]
) -> tuple[float, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    loss = objective(_call(model, x), y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    sq = sum(float(g.detach().square().sum()) for g in grads if g is not None)
    return float(loss.detach()), math.sqrt(sq)


#: :func:`train` warns when the L-BFGS finish ends with a gradient norm this many times ``tol`` or more (a BatchNorm
#: CNN trained 300 Adam steps ended at 0.092 after 99 iterations, silently; float32's floor is about 1e-4)
FAR_FROM_MINIMUM = 1000.0


def train(
    model: nn.Module,
    data: Tensor | Sequence[Tensor] | Data,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    weights: Tensor | None = None,
    steps: int = 1000,
    lr: float = 1e-2,
    optimizer: str = "adam",
    batch_size: int | None = None,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    generator: torch.Generator | None = None,
    tol: float = 1e-5,
    finish: str | None = "lbfgs",
    finish_iterations: int = 1000,
    stream: Callable[[int, torch.Generator], object] | None = None,
) -> TrainResult:
    """Train ``model`` in place towards a minimum of the empirical loss.

    The empirical loss is :math:`L_n(w) = \\text{loss\\_fn}(\\text{model}(X), Y)`
    on the whole data set, or with per-sample weights :math:`a_i` the weighted
    mean :math:`L_n(w) = \\sum_i a_i \\ell_i(w) / \\sum_i a_i` of the per-sample
    losses :math:`\\ell_i` (:class:`slt.losses.LossAdapter`: native for the
    PyTorch losses and for losses carrying a ``per_sample`` attribute, else
    ``torch.vmap``).  Training has two phases:

    1. ``steps`` steps of ``optimizer`` (on minibatches of size
       ``batch_size``, or full batch), with an optional L2 penalty
       ``weight_decay``.  Unweighted minibatches are drawn without
       replacement within epochs.  Weighted minibatches are drawn i.i.d.
       *with probability proportional to the weights* (with replacement, as
       :func:`slt.estimate_llc` draws them) and their loss is the plain
       ``loss_fn`` mean, an unbiased estimate of the weighted :math:`L_n`
       (importance sampling; zero-weight samples are never drawn);
       With ``stream``, the main phase instead takes a *fresh* minibatch
       ``stream(batch_size, generator)`` from the data distribution q at
       every step (online training on the population loss
       :math:`L(w) = E_q[\\ell(w)]`, as Elhage et al. 2022 train their toy
       models), and ``data`` serves only for the finishing phase and the
       reported loss;
    2. unless ``finish=None``, full-batch L-BFGS (strong Wolfe line search) on
       :math:`L_n` itself -- *without* weight decay, since :math:`w^*` must be
       a minimum of the loss the sampler uses -- in chunks of 50 iterations,
       until :math:`\\lVert\\nabla L_n\\rVert_2 <` ``tol``, ``finish_iterations``
       iterations are spent, or L-BFGS stops making progress.

    Parameters
    ----------
    model
        Any ``nn.Module`` (e.g. a :class:`slt.models.ChainModule`); its
        parameters become :math:`w^*`.
    data
        ``(X, Y)`` with ``X`` of shape ``(n, ...)`` and ``Y`` of shape
        ``(n, ...)``, or a single tensor ``X`` (then the target is ``X``, as
        for autoencoders such as the TMS), or a triple ``(X, Y, weights)``,
        or an :class:`slt.Data` (``y=None``: the target is ``x``; its
        ``weights``, if any, weight the loss).  As for :func:`slt.estimate_llc`, the
        inputs may also be a mapping of columns (the model is called as ``model(**batch)``;
        without a separate ``Y`` the loss receives the batch mapping, e.g.
        :func:`slt.losses.causal_lm`), NumPy arrays, or a torch or Hugging Face ``Dataset``.
        Must be on the model's device.
    loss_fn
        ``loss_fn(output, target) -> scalar``, the mean loss over a batch.
    weights
        ``(n,)`` non-negative per-sample weights with a positive sum (need not
        be normalized), or ``None``; not allowed together with weighted
        ``data``.  Integer weights are equivalent to repeating rows (exactly so
        for full-batch training, up to rounding); equal weights are the
        unweighted loss and take the unweighted code path.
    steps
        Main-phase optimiser steps (``>= 0``).
    lr
        Learning rate of the main phase (ignored by the finishing phase).
    optimizer
        ``"adam"``, ``"sgd"`` or ``"lbfgs"`` (full batch only).
    batch_size
        Minibatch size; ``None`` (or ``>= n``) means full batch.
    weight_decay
        L2 penalty coefficient in the main phase (gradient ``weight_decay * w``).
    momentum
        For ``optimizer="sgd"``.
    generator
        Source of the minibatch order.  ``None`` uses a fresh generator seeded
        with 0 (deterministic; torch's global RNG is never used).
    tol
        Gradient-norm threshold for ``converged`` and for stopping the
        finishing phase.
    finish
        ``"lbfgs"`` (default) or ``None`` (no finishing phase).
    finish_iterations
        Maximum number of L-BFGS iterations in the finishing phase.
    stream
        ``stream(batch_size, generator) -> batch``: a sampler of fresh
        minibatches from q (a tensor ``X`` or a pair ``(X, Y)`` with
        ``batch_size`` rows, shaped like ``data``), or ``None`` (minibatches
        drawn from ``data``).  Needs ``batch_size`` and a minibatch optimiser
        (``"adam"`` or ``"sgd"``); not allowed with weighted data.  With a
        finishing phase the end point is a minimum of :math:`L_n` again;
        ``finish=None`` keeps the online end point (a point near a minimum of
        the population loss, free of the finite-sample fit to ``data``).

    Returns
    -------
    TrainResult
        Final full-batch loss, gradient norm, ``converged`` and loss histories.

    Notes
    -----
    The line search needs measurable loss decreases, so the reachable gradient
    norm is limited by the floating-point resolution of the loss: about
    1e-8 to 1e-9 in float64 but only about 1e-4 in float32 (where
    ``converged`` may then be ``False`` at the default ``tol``).  To locate
    :math:`w^*` precisely, train in float64 (``model.double()``) and cast
    afterwards if needed.  For ReLU models :math:`L_n` is only piecewise
    smooth; L-BFGS still converges inside a smooth piece.

    Raises
    ------
    ValueError
        For bad arguments, including weights that are negative, NaN or
        infinite, sum to zero, have the wrong length or are given twice.
    FloatingPointError
        If the loss becomes non-finite.
    """
    x, y, w = _resolve_data(data, weights)
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    objective = _objective(loss_fn, None if w is None else LossAdapter(loss_fn), w)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    steps = check_int("steps", steps, 0)
    lr = check_real("lr", lr, positive=True)
    weight_decay = check_real("weight_decay", weight_decay, nonnegative=True)
    momentum = check_real("momentum", momentum, nonnegative=True)
    tol = check_real("tol", tol, positive=True)
    finish_iterations = check_int("finish_iterations", finish_iterations, 0)
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    if finish not in _FINISHERS:
        raise ValueError(f"finish must be one of {_FINISHERS}, got {finish!r}")
    n = num_rows(x)
    if stream is not None and not isinstance(x, Tensor):
        raise ValueError("stream needs tensor data (X or (X, Y)), not a mapping of columns")
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, 1)
        if batch_size >= n and stream is None:
            batch_size = None
    if optimizer == "lbfgs" and batch_size is not None:
        raise ValueError("optimizer='lbfgs' needs full batches (batch_size=None)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if stream is not None:
        if not callable(stream):
            raise ValueError(f"stream must be callable as stream(batch_size, generator), got {type(stream).__name__}")
        if batch_size is None:
            raise ValueError("stream needs a batch_size (the size of each fresh minibatch), got batch_size=None")
        if w is not None:
            raise ValueError("stream cannot be combined with weighted data: sample q_h itself in the stream")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")

    def check(value: float) -> float:
        if not math.isfinite(value):
            raise FloatingPointError(f"training diverged: loss became {value} (lower lr?)")
        return value

    # ---------------- main phase ----------------
    history: list[float] = []
    if steps > 0:
        if optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        elif optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        else:
            opt = torch.optim.LBFGS(
                params, lr=lr, max_iter=1, history_size=50, line_search_fn="strong_wolfe",
                tolerance_grad=0.0, tolerance_change=0.0,
            )

        if optimizer == "lbfgs":
            def closure() -> Tensor:
                opt.zero_grad()
                obj = objective(_call(model, x), y)
                if weight_decay:
                    obj = obj + 0.5 * weight_decay * sum(p.square().sum() for p in params)
                obj.backward()
                return obj

            for _ in range(steps):
                history.append(check(float(opt.step(closure).detach())))
        else:
            if batch_size is not None and generator is None:
                generator = torch.Generator().manual_seed(0)
            perm: Tensor | None = None
            pos = n
            for _ in range(steps):
                if batch_size is None:
                    xb, yb = x, y
                elif stream is not None:
                    assert generator is not None
                    xb, yb = _stream_batch(stream, batch_size, generator, x, y)
                else:
                    assert generator is not None
                    if w is not None:  # i.i.d. with probability ∝ weight: the plain mean is unbiased
                        idx = torch.multinomial(
                            w.to(generator.device), batch_size, replacement=True, generator=generator
                        ).to(_device(x))
                    else:
                        if pos + batch_size > n:  # new epoch
                            perm = torch.randperm(n, generator=generator, device=generator.device).to(_device(x))
                            pos = 0
                        assert perm is not None
                        idx = perm[pos : pos + batch_size]
                        pos += batch_size
                    xb = _map(lambda v: v[idx], x)  # rows of a tensor or of every column
                    yb = xb if y is x else _map(lambda v: v[idx], y)
                opt.zero_grad()
                loss = (objective if batch_size is None else loss_fn)(_call(model, xb), yb)
                loss.backward()
                opt.step()
                history.append(check(float(loss.detach())))
        for p in params:
            p.grad = None

    # ---------------- finishing phase ----------------
    finish_history: list[float] = []
    used = 0
    loss_val, gnorm = _loss_and_grad_norm(model, x, y, objective)
    check(loss_val)
    if finish == "lbfgs" and gnorm >= tol and finish_iterations > 0:
        chunk = 50
        lbfgs = torch.optim.LBFGS(
            params, lr=1.0, max_iter=chunk, history_size=50, line_search_fn="strong_wolfe",
            tolerance_grad=0.0, tolerance_change=0.0,
        )

        def full_closure() -> Tensor:
            lbfgs.zero_grad()
            obj = objective(_call(model, x), y)
            obj.backward()
            return obj

        while used < finish_iterations:
            it = min(chunk, finish_iterations - used)
            lbfgs.param_groups[0]["max_iter"] = it
            lbfgs.param_groups[0]["max_eval"] = it * 5 // 4
            chunk_end = used + it
            before = [p.detach().clone() for p in params]
            lbfgs.step(full_closure)
            used = int(lbfgs.state[params[0]].get("n_iter", used + it))
            new_loss, new_gnorm = _loss_and_grad_norm(model, x, y, objective)
            check(new_loss)
            if new_loss > loss_val:  # a failed line search can step uphill: undo it and stop
                with torch.no_grad():
                    for p, b in zip(params, before):
                        p.copy_(b)
                break
            finish_history.append(new_loss)
            moved = any(not torch.equal(p.detach(), b) for p, b in zip(params, before))
            loss_val, gnorm = new_loss, new_gnorm
            if gnorm < tol or not moved or used < chunk_end:  # converged, stuck, or L-BFGS stopped early
                break
        for p in params:
            p.grad = None

    if finish == "lbfgs" and gnorm >= FAR_FROM_MINIMUM * tol:
        # (float32's line search stalls near 1e-4, below this: only a point far from a minimum is named)
        warnings.warn(
            f"train: the L-BFGS finish ended with gradient norm {gnorm:.3g} after {used} iterations, {gnorm / tol:.0f}× "
            f"tol={tol:g}: w* is probably not a minimum of the loss, which slt.estimate_llc needs (λ̂ is then biased "
            "low; its slope check says by how much); train longer (steps=, finish_iterations=) or in float64 "
            "(model.double()), or check for a loss that is not smooth there", RuntimeWarning, stacklevel=2)
    return TrainResult(
        loss=loss_val,
        grad_norm=gnorm,
        converged=gnorm < tol,
        history=history,
        finish_history=finish_history,
        steps=steps,
        finish_iterations=used,
    )
