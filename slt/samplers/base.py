r"""What every sampler shares: the potential, the Langevin integrator, the MALA
diagnostic, and the ``init``/``step``/``reset`` interface.

Every sampler targets

.. math::

    p(w) \propto \exp\bigl(-U(w)\bigr), \qquad
    U(w) = n\beta\, L_n(w) + \tfrac{\gamma}{2} \lVert w - w^* \rVert^2 ,

with ``L_n`` replaced by a minibatch loss ``L_B`` at every step.  Parameters are
flat ``(C, d)`` tensors: row ``c`` is chain ``c``.  A built sampler
(:class:`Sampler`) is ``init(params) -> State``, ``step(state, batch, rng) ->
(State, SamplerInfo)`` and ``reset(state, rows, w_star) -> State`` (the blackjax
design): ``step`` is a function of its arguments, with no hidden mutation, so a
run is a fold of ``step`` over batches (:func:`slt.loop.run_chains`), and every
sampler has its own ``State`` (a NamedTuple with at least ``params`` and
``step``).  ``reset`` puts the chains in ``rows`` back at ``w*`` with a fresh
auxiliary state (momentum, preconditioner, thermostat): the run loop calls it
for divergent chains and never edits a state's fields itself.

A sampler *value* that does not yet know its potential and step size is a
:class:`SamplerSpec` (e.g. ``slt.samplers.sghmc(friction=0.05)``): the engine
binds it to the prepared target with :meth:`SamplerSpec.bind`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import torch
from torch import Tensor

__all__ = [
    "LocalizedPotential",
    "SamplerState",
    "SamplerInfo",
    "Sampler",
    "SamplerSpec",
    "NoiseSource",
    "normal",
    "langevin_step",
    "mala_acceptance",
    "reset_rows",
    "check_step_size",
    "check_mala_every",
    "sqrt",
]

# loss_and_grad(params (C, d), batch) -> (loss (C,), grad of loss wrt params (C, d))
LossAndGrad = Callable[[Tensor, Any], tuple[Tensor, Tensor]]


class NoiseSource(Protocol):
    """Anything with ``normal(like) -> Tensor`` shaped like ``like`` (e.g. :class:`slt.rng.ChainRNG`)."""

    def normal(self, like: Tensor) -> Tensor: ...


def normal(rng: torch.Generator | NoiseSource, like: Tensor) -> Tensor:
    """Standard normal noise shaped like ``like`` from a generator or a :class:`NoiseSource`."""
    if isinstance(rng, torch.Generator):
        return torch.randn(like.shape, generator=rng, device=like.device, dtype=like.dtype)
    return rng.normal(like)


@dataclass(frozen=True)
class LocalizedPotential:
    r"""U(w) = nβ L_B(w) + γ/2 ‖w − w*‖², batched over chains.

    Parameters
    ----------
    loss_and_grad
        ``(params (C, d), batch) -> (L_B (C,), ∇L_B (C, d))``.
    w_star
        ``(C, d)`` centre of localization (one row per chain; rows of chains of
        the same checkpoint are equal).
    nbeta
        Inverse temperature times sample size, a float or a ``(C,)`` tensor.
    localization
        γ ≥ 0.
    """

    loss_and_grad: LossAndGrad
    w_star: Tensor
    nbeta: float | Tensor
    localization: float

    def _nb(self) -> Tensor | float:
        return self.nbeta.unsqueeze(-1) if isinstance(self.nbeta, Tensor) else self.nbeta

    def __call__(self, params: Tensor, batch: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns ``(L_B (C,), ∇L_B (C, d), U (C,), ∇U (C, d))``."""
        loss, grad = self.loss_and_grad(params, batch)
        diff = params - self.w_star  # the only (C, d) temporary besides ∇U
        nb = self._nb()
        nb_flat = nb.squeeze(-1) if isinstance(nb, Tensor) else nb
        U = nb_flat * loss + 0.5 * self.localization * torch.einsum("...d,...d->...", diff, diff)
        if isinstance(nb, Tensor):
            grad_U = torch.addcmul(diff.mul_(self.localization), nb, grad)
        else:
            grad_U = diff.mul_(self.localization).add_(grad, alpha=nb)
        return loss, grad, U, grad_U


class SamplerState(Protocol):
    """What every sampler state has: ``params`` (C, d) and ``step`` (steps taken)."""

    @property
    def params(self) -> Tensor: ...

    @property
    def step(self) -> int: ...


class SamplerInfo(NamedTuple):
    """Diagnostics of one step, all per chain.

    ``loss``: L_B at the pre-step position (the draw), (C,); ``potential``: U_B
    there, (C,); ``grad_norm``: ‖∇U_B‖, (C,), or ``None`` (the built-in samplers leave
    it out: a pass over the (C, d) gradient every step that the run loop never reads);
    ``mala_accept``: MALA acceptance
    probability of the proposal, (C,) or ``None`` when not computed this step
    (or not defined for the sampler).
    """

    loss: Tensor
    potential: Tensor
    grad_norm: Tensor | None
    mala_accept: Tensor | None


def _no_reset(state: Any, rows: Tensor, w_star: Tensor) -> Any:
    raise NotImplementedError("this sampler has no reset(state, rows, w_star)")


class Sampler(NamedTuple):
    """A sampler bound to a potential and a step size.

    ``init(params (C, d)) -> State``; ``step(state, batch, rng) -> (State, SamplerInfo)``;
    ``reset(state, rows (C,) bool, w_star (C, d)) -> State`` restarts ``rows`` at ``w_star``.
    ``step_size`` is a number or a ``(C, 1)`` tensor (one step size per row, e.g. per
    checkpoint); a state never depends on it, so a sampler may be re-bound to another
    step size between steps (step-size adaptation does).
    """

    name: str
    init: Callable[[Tensor], Any]
    step: Callable[[Any, Any, Any], tuple[Any, SamplerInfo]]
    step_size: float
    reset: Callable[[Any, Tensor, Tensor], Any] = _no_reset


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler chosen by value, before it knows its potential and step size.

    ``factory(potential, step_size, *, deterministic, mala_every, **kwargs) -> Sampler``
    builds it; ``kwargs`` are the sampler's own hyperparameters.  Every sampler
    function of :mod:`slt.samplers` returns one when called without a potential
    (``slt.samplers.sghmc(friction=0.05)``); a custom sampler is
    ``SamplerSpec("mine", my_factory, {...})``.
    """

    name: str
    factory: Callable[..., Sampler]
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def bind(self, potential: LocalizedPotential, step_size: float, **engine_kwargs: Any) -> Sampler:
        """Build the sampler; ``engine_kwargs`` (``deterministic``, ``mala_every``, extra
        sampler arguments) must not repeat a hyperparameter set in the spec."""
        clash = sorted(set(self.kwargs) & set(engine_kwargs))
        if clash:
            raise ValueError(f"sampler {self.name!r} already sets {clash}; do not pass them again in sampler_kwargs")
        return self.factory(potential, step_size, **dict(self.kwargs), **engine_kwargs)

    def accepts(self, argument: str) -> bool:
        """Whether the sampler's factory takes ``argument`` (e.g. ``"reuse_batch"``)."""
        import inspect

        try:
            params = inspect.signature(self.factory).parameters
        except (TypeError, ValueError):
            return False
        return argument in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.name}({args})"


# ----------------------------------------------------------------------------
# the integrator and the MALA diagnostic (written once; used by every Langevin sampler,
# the step-size pilot and slt.phases)
# ----------------------------------------------------------------------------
def langevin_step(
    w: Tensor, grad_U: Tensor, xi: Tensor, step_size: float | Tensor, precond: float | Tensor = 1.0
) -> Tensor:
    r"""One (preconditioned) Langevin step: :math:`w - \tfrac{\epsilon}{2} G \nabla U + \sqrt{\epsilon G}\,\xi`.

    Euler–Maruyama discretisation of :math:`dw = -\tfrac12 G\nabla U\,dt + \sqrt{G}\,dB`
    (Welling & Teh 2011; with a preconditioner G, Li et al. 2016).  ``step_size`` is a
    float or a per-chain ``(C, 1)`` tensor; ``precond`` 1 or a ``(C, d)`` tensor; ``xi``
    standard normal ``(C, d)``.
    """
    if isinstance(precond, Tensor):
        return w - (0.5 * step_size) * precond * grad_U + xi * (step_size * precond).sqrt()
    if isinstance(step_size, Tensor):  # per-chain (C, 1) steps
        eps = step_size * precond if precond != 1.0 else step_size
        return torch.addcmul(w, grad_U, -0.5 * eps).addcmul_(xi, eps.sqrt())
    # a number: one fresh (C, d) tensor, updated in place (no other parameter-sized temporaries)
    return torch.add(w, grad_U, alpha=-0.5 * step_size * precond).add_(xi, alpha=math.sqrt(step_size * precond))


def mala_acceptance(
    w: Tensor, w_new: Tensor, U: Tensor, grad_U: Tensor, U_new: Tensor, grad_U_new: Tensor,
    step_size: float | Tensor, precond: float | Tensor = 1.0,
) -> Tensor:
    r"""Metropolis-adjusted acceptance probability of the Langevin proposal, (C,).

    With :math:`q(w'|w) = \mathcal N(w - \tfrac\epsilon2 G\nabla U(w), \epsilon G)`:
    :math:`\alpha = \min(1, \exp[U(w) - U(w') + \log q(w|w') - \log q(w'|w)])`
    (Roberts & Tweedie 1996), on the same batch at both points; the same ``G`` is
    used both ways.  A diagnostic: the proposal is always taken.
    """
    half = 0.5 * step_size
    eps = step_size.reshape(-1) if isinstance(step_size, Tensor) else step_size
    # log q(w' | w) and log q(w | w'), up to the same constant (same G both ways)
    fwd = (w_new - (w - half * precond * grad_U)).square() / precond
    bwd = (w - (w_new - half * precond * grad_U_new)).square() / precond
    log_q_fwd = -fwd.sum(-1) / (2 * eps)
    log_q_bwd = -bwd.sum(-1) / (2 * eps)
    log_alpha = U - U_new + log_q_bwd - log_q_fwd
    return torch.clamp(log_alpha, max=0.0).exp()


def reset_rows(t: Tensor, rows: Tensor, value: Tensor | float) -> Tensor:
    """``t`` with the rows where ``rows`` (C,) is True replaced by ``value`` (a (C, ...) tensor or a number)."""
    mask = rows.view(-1, *([1] * (t.ndim - 1)))
    if not isinstance(value, Tensor):
        value = torch.full_like(t, float(value))
    return torch.where(mask, value, t)


def check_step_size(step_size: Any) -> None:
    """A positive finite number, or a tensor of them (one per row: ``(C, 1)``)."""
    if isinstance(step_size, Tensor):
        if not bool(torch.isfinite(step_size).all() and (step_size > 0).all()):
            raise ValueError(f"step sizes must be positive and finite, got {step_size.flatten().tolist()}")
        return
    if not (step_size > 0) or step_size != step_size or step_size == float("inf"):
        raise ValueError(f"step_size must be a positive finite number, got {step_size}")


def sqrt(x: float | Tensor) -> float | Tensor:
    """√x for a number or a tensor."""
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def check_mala_every(mala_every: Any) -> None:
    if mala_every < 0:
        raise ValueError(f"mala_every must be >= 0 (0 disables), got {mala_every}")
