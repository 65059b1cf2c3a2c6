r"""SGLD and RMSProp-preconditioned SGLD.

``sgld``
    Stochastic gradient Langevin dynamics (Welling & Teh 2011), as used for the
    LLC by Lau et al. (2023, arXiv 2308.12108):
    :math:`\Delta w = -\tfrac{\epsilon}{2} \nabla U_B(w) + \mathcal N(0, \epsilon I)`.
``rmsprop_sgld``
    RMSProp-preconditioned SGLD (Li et al. 2016; for the LLC Hitchcock & Hoogland
    2025, arXiv 2507.21449): :math:`v \leftarrow \alpha v + (1-\alpha) g^2` with
    ``g = ∇L_B(w)`` (the loss gradient only), :math:`G = 1/(\sqrt v + a)`,
    :math:`\Delta w = -\tfrac{\epsilon}{2} G \odot \nabla U_B(w) + \sqrt{\epsilon G}\,\xi`.
    By default v stops updating at the end of burn-in (``freeze=True``): the draws then follow a
    fixed diagonal metric G and target the posterior exactly (up to the discretisation), as a
    mass matrix adapted during warm-up does in Stan; ``freeze=False`` keeps Li et al.'s running
    preconditioner (devinterp's), whose stationary law is only approximately the posterior.

MALA diagnostic
---------------
With proposal :math:`q(w'|w) = \mathcal N(w - \tfrac\epsilon2 G\nabla U(w), \epsilon G)`
the Metropolis-adjusted acceptance probability is
:math:`\log\alpha = \min(0, U(w) - U(w') + \log q(w|w') - \log q(w'|w))`, evaluated
on the same minibatch at both points (:func:`slt.samplers.base.mala_acceptance`).
It is a diagnostic only (the proposal is always accepted); healthy step sizes
give values near 0.9.  On a minibatch it costs one extra gradient evaluation, so
it is computed every ``mala_every`` steps; with full-batch gradients
(``deterministic=True``) the evaluation at the proposal is the next step's, so it
is free and computed every step.  With ``reuse_batch=True`` it is free on
minibatches too: after a MALA step the state keeps the evaluation at the
proposal (``cache``) and the *next step must use the same minibatch*
(:func:`slt.loop.run_chains` and :func:`slt.stepsize.adapt_step_size` do: a
state with a cache is stepped on the batch it was computed on).  One batch in
``mala_every`` is used for two consecutive steps, so the loss recorded at the
second is taken on the batch that just moved the chain, and is biased low:
:func:`slt.stepsize.adapt_step_size` reuses (it needs the acceptance, not the
loss), the engine's draws do not.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from .base import (
    LocalizedPotential,
    Sampler,
    SamplerInfo,
    SamplerSpec,
    acceptance,
    check_mala_every,
    check_step_size,
    column_chunks,
    fused_langevin,
    fused_mala,
    initial_params,
    owned_normal,
    reset_rows,
    rowsum64,
    zeros_like_params,
)

__all__ = ["SGLDState", "RMSPropSGLDState", "sgld", "rmsprop_sgld"]

Cache = tuple[Tensor, Tensor, Tensor]


class SGLDState(NamedTuple):
    """``params`` (C, d); ``step`` steps taken; ``cache``: ``(L, ∇L, U)`` at
    ``params`` on the last batch, when the potential is deterministic (full batch) or
    after a MALA step with ``reuse_batch``, else ``None`` (a state with a cache must be
    stepped on that batch).  ∇U is not kept: the step forms it from ∇L a chunk at a time."""

    params: Tensor
    step: int
    cache: Cache | None


class RMSPropSGLDState(NamedTuple):
    """As :class:`SGLDState`, plus ``precond_v`` (C, d), RMSProp's running second moment of ∇L, and
    ``frozen``: True once the burn-in has ended (``Sampler.end_burnin``) and v no longer changes."""

    params: Tensor
    precond_v: Tensor
    step: int
    cache: Cache | None
    frozen: bool = False


def _langevin_sampler(
    name: str,
    potential: LocalizedPotential,
    step_size: float,
    deterministic: bool,
    mala_every: int,
    precondition: Callable[[Any, Tensor], tuple[Callable[[slice], Tensor] | None, Any]] | None,
    new_aux: Callable[[Tensor], Any],
    make_state: Callable[[Tensor, Any, int, Cache | None], Any],
    aux_of: Callable[[Any], Any],
    reuse_batch: bool = False,
    relaxation_gain: float = 1.0,
    reset_aux: Callable[[Any, Tensor], Any] | None = None,
    end_burnin: Callable[[Any], Any] | None = None,
    metric: Callable[[Any], Callable[[slice], Tensor] | None] | None = None,
) -> Sampler:
    """The SGLD step, shared by both samplers: ``precondition(aux, ∇L) -> (G's columns, aux')``.

    Memory: the step allocates the new position in the noise buffer (:func:`owned_normal`) and
    forms ∇U a chunk of columns at a time (:func:`fused_langevin`); on a MALA step the first half
    of the acceptance sums is taken before ∇L at ``w`` is dropped, so while the proposal is
    evaluated the live parameter-sized tensors are ``w``, ``w_new``, the new gradient (and
    RMSProp's second moment).  Inputs are never written except RMSProp's second moment, which the
    step updates in place (the state's own tensor, made by ``init``/``reset``): ``state``'s params
    and cache stay valid; a state is stepped once (the engine never re-runs from a kept state)."""
    check_step_size(step_size)
    check_mala_every(mala_every)

    def init(params: Tensor) -> Any:
        params = initial_params(params)  # w* broadcast rows are kept without a copy: steps never write inputs
        return make_state(params, new_aux(params), 0, None)

    def step(state: Any, batch: Any, rng: Any) -> tuple[Any, SamplerInfo]:
        w = state.params
        mala = bool(deterministic or (mala_every and state.step % mala_every == 0))
        loss, grad, U = state.cache if state.cache is not None else potential.loss_grad(w, batch, mala)
        G, aux = (None, None) if precondition is None else precondition(aux_of(state), grad)
        # ‖∇L_B‖² on MALA steps of plain SGLD (one more pass over the gradient, a chunk of columns at a time)
        grad_sq = (sum(rowsum64(grad[:, sl].square()) for sl in column_chunks(grad))
                   if mala and precondition is None else None)
        w_new, first = fused_langevin(potential, w, grad, owned_normal(rng, w), step_size, G, mala)
        del grad  # ∇L at w: not needed any more (freed here unless the input state's cache holds it)
        accept = log_r = cache = None
        if mala:
            loss_n, grad_n, U_n = potential.loss_grad(w_new, batch)
            log_r = fused_mala(potential, w, w_new, grad_n, U, U_n, step_size, first, G)
            accept = acceptance(log_r, U.dtype)
            if deterministic or (reuse_batch and mala_every > 1):  # every batch used at most twice
                cache = (loss_n, grad_n, U_n)
        info = SamplerInfo(loss.detach(), None if U is None else U.detach(), None, accept, log_r, grad_sq)
        return make_state(w_new, aux, state.step + 1, cache), info

    def reset(state: Any, rows: Tensor, w_star: Tensor) -> Any:
        aux = aux_of(state)
        if aux is not None and reset_aux is not None:
            aux = reset_aux(aux, rows)
        return make_state(reset_rows(state.params, rows, w_star), aux, state.step, None)

    return Sampler(name, init, step, step_size, reset, relaxation_gain, end_burnin, metric)


def sgld(
    potential: LocalizedPotential | None = None,
    step_size: float | None = None,
    *,
    deterministic: bool = False,
    mala_every: int = 10,
    reuse_batch: bool = False,
) -> Sampler | SamplerSpec:
    r"""SGLD: :math:`w \leftarrow w - \tfrac{\epsilon}{2}\nabla U_B(w) + \mathcal N(0, \epsilon I)`.

    Welling & Teh (2011); Lau et al. (2023) for the LLC.  ``deterministic=True``
    declares full-batch gradients (enables the free every-step MALA diagnostic);
    ``reuse_batch=True`` makes the diagnostic free on minibatches (see the module docstring).
    Without a potential, returns the :class:`SamplerSpec` ``sgld()`` for
    ``slt.estimate_llc(..., sampler=...)``.
    """
    if potential is None:
        return SamplerSpec("sgld", sgld)
    return _langevin_sampler(
        "sgld", potential, step_size, deterministic, mala_every, None,
        new_aux=lambda p: None,
        make_state=lambda p, aux, t, cache: SGLDState(p, t, cache),
        aux_of=lambda s: None, reuse_batch=reuse_batch,
    )


def rmsprop_sgld(
    potential: LocalizedPotential | None = None,
    step_size: float | None = None,
    *,
    alpha: float = 0.99,
    eps: float = 0.1,
    freeze: bool = True,
    deterministic: bool = False,
    mala_every: int = 10,
    reuse_batch: bool = False,
) -> Sampler | SamplerSpec:
    r"""RMSProp-preconditioned SGLD (``reuse_batch`` as for :func:`sgld`).

    :math:`v \leftarrow \alpha v + (1-\alpha)(\nabla L_B)^2`,
    :math:`G = 1/(\sqrt v + a)`,
    :math:`w \leftarrow w - \tfrac{\epsilon}{2} G \odot \nabla U_B(w) + \sqrt{\epsilon G}\,\xi`.

    Li, Chen, Carlson & Carin (2016); Hitchcock & Hoogland (2025, arXiv
    2507.21449), whose defaults α = 0.99, a = 0.1 are used.  Flat directions get larger
    steps, up to 1/a times ε (``Sampler.relaxation_gain``: a direction held by γ alone relaxes
    1/a times faster than under SGLD, which the automatic burn-in counts).

    ``freeze=True`` (default): v adapts during burn-in only; :func:`slt.loop.run_chains` freezes
    it before the first draw (``Sampler.end_burnin``; a run without burn-in keeps it running).  With
    G fixed the step is SGLD in the metric G, whose stationary law is the posterior up to the
    discretisation (Girolami & Calderhead 2011 with a constant metric; Stan's adapted diagonal mass
    matrix), the MALA diagnostic is exact for it, and the end-of-run checks apply with G in place of
    I: a free walk spreads as ε t tr G, and minibatch noise heats λ̂ by
    :math:`\tfrac\epsilon8(n\beta)^2\operatorname{tr}(G\operatorname{Cov}[\nabla L_B])`.  A divergent
    row restarted at w* keeps its frozen metric.  ``freeze=False``: the running preconditioner of Li et
    al. and devinterp, which depends on the chain's history, so the chain targets the posterior only
    approximately.  Without a potential, returns a :class:`SamplerSpec`.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"rmsprop alpha must lie in [0, 1), got {alpha}")
    if not eps > 0:
        raise ValueError(f"rmsprop eps (a) must be positive, got {eps}")
    if potential is None:
        return SamplerSpec("rmsprop_sgld", rmsprop_sgld, {"alpha": alpha, "eps": eps, "freeze": freeze})

    def cols(v: Tensor) -> Callable[[slice], Tensor]:
        # G = 1/(√v + a), a chunk at a time, never stored (fresh: the caller may write into it)
        return lambda sl: 1.0 / (v[:, sl].sqrt().add_(eps))

    def precondition(aux: tuple[Tensor, bool], grad: Tensor) -> tuple[Callable[[slice], Tensor], tuple[Tensor, bool]]:
        v, frozen = aux
        if frozen:
            return cols(v), aux
        # v ← αv + (1-α)∇L² in place, a chunk of columns at a time: the state's second moment is the
        # sampler's own (made by init/reset, never a caller's tensor), and a copy would cost one more
        # parameter-sized tensor per chain.  The step thus consumes the input state's v.
        if v.shape[0] > 1 and v.stride(0) == 0:  # init's broadcast zeros: the first step makes v its own
            v = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
        for sl in column_chunks(v):
            v[:, sl].mul_(alpha).add_(grad[:, sl].square().mul_(1.0 - alpha))
        return cols(v), (v, False)

    def reset_aux(aux: tuple[Tensor, bool], rows: Tensor) -> tuple[Tensor, bool]:
        v, frozen = aux
        return aux if frozen else (reset_rows(v, rows, 0.0), False)  # a frozen metric is kept

    def end_burnin(state: RMSPropSGLDState) -> RMSPropSGLDState:
        # no gradient seen yet (no burn-in): v is zero and G = 1/a everywhere, so keep adapting
        if not freeze or state.frozen or state.step == 0:
            return state
        return state._replace(frozen=True)

    def metric(state: RMSPropSGLDState) -> Callable[[slice], Tensor] | None:
        return cols(state.precond_v) if state.frozen else None

    return _langevin_sampler(
        "rmsprop_sgld", potential, step_size, deterministic, mala_every, precondition,
        new_aux=lambda p: (zeros_like_params(p), False),
        make_state=lambda p, aux, t, cache: RMSPropSGLDState(p, aux[0], t, cache, aux[1]),
        aux_of=lambda s: (s.precond_v, s.frozen), reuse_batch=reuse_batch,
        relaxation_gain=1.0 / eps,  # G = 1/(√v + a) → 1/a where the loss is flat (∇L = 0, so v → 0)
        reset_aux=reset_aux, end_burnin=end_burnin, metric=metric,
    )
