"""Training a model to a minimum of its empirical loss (the point :math:`w^*`).

The LLC estimator :math:`\\hat\\lambda = n\\beta(E[L_n(w)] - L_n(w^*))` (Lau et al.
2025, arXiv 2308.12108) assumes that :math:`w^*` is a local minimum of the
*empirical* loss :math:`L_n`, the very function the sampler explores.  If it is
not, chains drift to lower loss, :math:`\\hat\\lambda` is biased low and can turn
negative.  :func:`train` therefore runs an ordinary optimiser (Adam, SGD or
L-BFGS, full batch or minibatches) and then a full-batch L-BFGS *finishing
phase* on :math:`L_n` itself, and reports the final full-batch gradient norm.

A small gradient norm certifies a critical point, not a minimum: e.g. the
origin of :class:`slt.models.NormalCrossing` has zero gradient but is a saddle
of :math:`L_n` for most data sets.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["TrainResult", "train", "full_batch_loss_and_grad_norm"]

_OPTIMIZERS = ("adam", "sgd", "lbfgs")
_FINISHERS = ("lbfgs", None)


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes
    ----------
    loss
        Final full-batch empirical loss :math:`L_n(w^*)` (without weight decay).
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


def _unpack(data: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    if isinstance(data, Tensor):
        x, y = data, data
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
    else:
        raise ValueError("data must be a tensor X (target X itself) or a pair (X, Y) of tensors")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"data must have a non-empty leading sample dimension, got shape {tuple(x.shape)}")
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of samples, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    return x, y


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_real(name: str, value: object, *, positive: bool) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'}, got {value!r}")
    return v


def full_batch_loss_and_grad_norm(
    model: nn.Module,
    data: Tensor | Sequence[Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> tuple[float, float]:
    """Full-batch loss :math:`L_n(w)` and :math:`\\lVert \\nabla L_n(w) \\rVert_2` at the model's parameters.

    Parameters
    ----------
    model, data, loss_fn
        As for :func:`train`.

    Returns
    -------
    (float, float)
        ``(loss, grad_norm)``; the model's ``.grad`` fields are not touched.
    """
    x, y = _unpack(data)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    sq = sum(float(g.detach().square().sum()) for g in grads if g is not None)
    return float(loss.detach()), math.sqrt(sq)


def train(
    model: nn.Module,
    data: Tensor | Sequence[Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
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
) -> TrainResult:
    """Train ``model`` in place towards a minimum of the empirical loss.

    The empirical loss is :math:`L_n(w) = \\text{loss\\_fn}(\\text{model}(X), Y)`
    on the whole data set.  Training has two phases:

    1. ``steps`` steps of ``optimizer`` (on minibatches of size
       ``batch_size`` drawn without replacement within epochs, or full batch),
       with an optional L2 penalty ``weight_decay``;
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
        for autoencoders such as the TMS).  Must be on the model's device.
    loss_fn
        ``loss_fn(output, target) -> scalar``, the mean loss over a batch.
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
        For bad arguments.
    FloatingPointError
        If the loss becomes non-finite.
    """
    x, y = _unpack(data)
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    steps = _check_int("steps", steps, 0)
    lr = _check_real("lr", lr, positive=True)
    weight_decay = _check_real("weight_decay", weight_decay, positive=False)
    momentum = _check_real("momentum", momentum, positive=False)
    tol = _check_real("tol", tol, positive=True)
    finish_iterations = _check_int("finish_iterations", finish_iterations, 0)
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    if finish not in _FINISHERS:
        raise ValueError(f"finish must be one of {_FINISHERS}, got {finish!r}")
    n = x.shape[0]
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1)
        if batch_size >= n:
            batch_size = None
    if optimizer == "lbfgs" and batch_size is not None:
        raise ValueError("optimizer='lbfgs' needs full batches (batch_size=None)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
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
                obj = loss_fn(model(x), y)
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
                else:
                    if pos + batch_size > n:  # new epoch
                        assert generator is not None
                        perm = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
                        pos = 0
                    assert perm is not None
                    idx = perm[pos : pos + batch_size]
                    pos += batch_size
                    xb, yb = x[idx], y[idx]
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
                history.append(check(float(loss.detach())))
        for p in params:
            p.grad = None

    # ---------------- finishing phase ----------------
    finish_history: list[float] = []
    used = 0
    loss_val, gnorm = full_batch_loss_and_grad_norm(model, (x, y), loss_fn)
    check(loss_val)
    if finish == "lbfgs" and gnorm >= tol and finish_iterations > 0:
        chunk = 50
        lbfgs = torch.optim.LBFGS(
            params, lr=1.0, max_iter=chunk, history_size=50, line_search_fn="strong_wolfe",
            tolerance_grad=0.0, tolerance_change=0.0,
        )

        def full_closure() -> Tensor:
            lbfgs.zero_grad()
            obj = loss_fn(model(x), y)
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
            new_loss, new_gnorm = full_batch_loss_and_grad_norm(model, (x, y), loss_fn)
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

    return TrainResult(
        loss=loss_val,
        grad_norm=gnorm,
        converged=gnorm < tol,
        history=history,
        finish_history=finish_history,
        steps=steps,
        finish_iterations=used,
    )
