r"""Chain-batched stochastic-gradient MCMC samplers for the localized tempered posterior.

Every sampler targets

.. math::

    p(w) \propto \exp\bigl(-U(w)\bigr), \qquad
    U(w) = n\beta\, L_n(w) + \tfrac{\gamma}{2} \lVert w - w^* \rVert^2 ,

with ``L_n`` replaced by a minibatch loss ``L_B`` at every step.  Parameters are
flat ``(C, d)`` tensors: row ``c`` is chain ``c``.  A sampler is a pair
``init(params) -> State`` and ``step(state, batch, rng) -> (State, Info)``
(the blackjax design): the step is a function of its arguments, with no hidden
mutation, so a run is a fold of ``step`` over batches.

Samplers
--------
``sgld``
    Stochastic gradient Langevin dynamics (Welling & Teh 2011), as used for the
    LLC by Lau et al. (2023, arXiv 2308.12108):
    :math:`\Delta w = -\tfrac{\epsilon}{2} \nabla U_B(w) + \mathcal N(0, \epsilon I)`.
``rmsprop_sgld``
    RMSProp-preconditioned SGLD (Li et al. 2016; for the LLC Hitchcock & Hoogland
    2025, arXiv 2507.21449): :math:`v \leftarrow \alpha v + (1-\alpha) g^2` with
    ``g = ∇L_B(w)`` (the loss gradient only), :math:`G = 1/(\sqrt v + a)`,
    :math:`\Delta w = -\tfrac{\epsilon}{2} G \odot \nabla U_B(w) + \sqrt{\epsilon G}\,\xi`.

MALA diagnostic
---------------
With proposal :math:`q(w'|w) = \mathcal N(w - \tfrac\epsilon2 G\nabla U(w), \epsilon G)`
the Metropolis-adjusted acceptance probability is
:math:`\log\alpha = \min(0, U(w) - U(w') + \log q(w|w') - \log q(w'|w))`, evaluated
on the same minibatch at both points.  It is a diagnostic only (the proposal is
always accepted); healthy step sizes give values near 0.9.  On a minibatch it
costs one extra gradient evaluation, so it is computed every ``mala_every``
steps; with full-batch gradients the evaluation at the proposal is the next
step's, so it is free and computed every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol

import torch
from torch import Tensor

__all__ = [
    "LocalizedPotential",
    "SamplerState",
    "SamplerInfo",
    "Sampler",
    "sgld",
    "rmsprop_sgld",
    "build_sampler",
    "SAMPLERS",
]

# loss_and_grad(params (C, d), batch) -> (loss (C,), grad of loss wrt params (C, d))
LossAndGrad = Callable[[Tensor, Any], tuple[Tensor, Tensor]]


class NoiseSource(Protocol):
    def normal(self, like: Tensor) -> Tensor: ...


def _normal(rng: torch.Generator | NoiseSource, like: Tensor) -> Tensor:
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
        diff = params - self.w_star
        nb = self._nb()
        nb_flat = nb.squeeze(-1) if isinstance(nb, Tensor) else nb
        U = nb_flat * loss + 0.5 * self.localization * diff.square().sum(-1)
        grad_U = nb * grad + self.localization * diff
        return loss, grad, U, grad_U


class SamplerState(NamedTuple):
    """What the next step needs.

    ``params`` (C, d); ``precond_v`` (C, d) RMSProp second moment (``None`` for
    SGLD); ``step`` number of steps taken; ``cache``: ``(L, ∇L, U, ∇U)`` at
    ``params`` when the potential is deterministic (full batch), else ``None``.
    """

    params: Tensor
    precond_v: Tensor | None
    step: int
    cache: tuple[Tensor, Tensor, Tensor, Tensor] | None


class SamplerInfo(NamedTuple):
    """Diagnostics of one step, all per chain.

    ``loss``: L_B at the pre-step position (the draw), (C,); ``potential``: U_B
    there, (C,); ``grad_norm``: ‖∇U_B‖, (C,); ``mala_accept``: MALA acceptance
    probability of the proposal, (C,) or ``None`` when not computed this step.
    """

    loss: Tensor
    potential: Tensor
    grad_norm: Tensor
    mala_accept: Tensor | None


class Sampler(NamedTuple):
    name: str
    init: Callable[[Tensor], SamplerState]
    step: Callable[[SamplerState, Any, Any], tuple[SamplerState, SamplerInfo]]
    step_size: float


def _mala_log_accept(
    w: Tensor, w_new: Tensor, U: Tensor, grad_U: Tensor, U_new: Tensor, grad_U_new: Tensor,
    step_size: float, G: Tensor | float,
) -> Tensor:
    half = 0.5 * step_size
    # log q(w' | w) and log q(w | w'), up to the same constant (same G both ways)
    fwd = (w_new - (w - half * G * grad_U)).square() / G
    bwd = (w - (w_new - half * G * grad_U_new)).square() / G
    log_q_fwd = -fwd.sum(-1) / (2 * step_size)
    log_q_bwd = -bwd.sum(-1) / (2 * step_size)
    log_alpha = U - U_new + log_q_bwd - log_q_fwd
    return torch.clamp(log_alpha, max=0.0).exp()


def _make_sampler(
    name: str,
    potential: LocalizedPotential,
    step_size: float,
    *,
    deterministic: bool,
    mala_every: int,
    rmsprop: tuple[float, float] | None,
) -> Sampler:
    if not (step_size > 0) or step_size != step_size or step_size == float("inf"):
        raise ValueError(f"step_size must be a positive finite number, got {step_size}")
    if mala_every < 0:
        raise ValueError(f"mala_every must be >= 0 (0 disables), got {mala_every}")
    if rmsprop is not None:
        alpha, a = rmsprop
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"rmsprop alpha must lie in [0, 1), got {alpha}")
        if not a > 0:
            raise ValueError(f"rmsprop eps (a) must be positive, got {a}")

    def init(params: Tensor) -> SamplerState:
        v = torch.zeros_like(params) if rmsprop is not None else None
        return SamplerState(params.detach().clone(), v, 0, None)

    def step(state: SamplerState, batch: Any, rng: Any) -> tuple[SamplerState, SamplerInfo]:
        w = state.params
        if state.cache is not None:
            loss, grad, U, grad_U = state.cache
        else:
            loss, grad, U, grad_U = potential(w, batch)
        v = state.precond_v
        if rmsprop is not None:
            alpha, a = rmsprop
            v = alpha * v + (1.0 - alpha) * grad.square()
            G: Tensor | float = 1.0 / (v.sqrt() + a)
            noise = _normal(rng, w) * (step_size * G).sqrt()
        else:
            G = 1.0
            noise = _normal(rng, w) * step_size**0.5
        w_new = w - (0.5 * step_size) * G * grad_U + noise

        accept = None
        cache = None
        if deterministic or (mala_every and state.step % mala_every == 0):
            loss_n, grad_n, U_n, grad_U_n = potential(w_new, batch)
            accept = _mala_log_accept(w, w_new, U, grad_U, U_n, grad_U_n, step_size, G)
            if deterministic:
                cache = (loss_n, grad_n, U_n, grad_U_n)
        info = SamplerInfo(loss.detach(), U.detach(), grad_U.norm(dim=-1), accept)
        return SamplerState(w_new, v, state.step + 1, cache), info

    return Sampler(name, init, step, step_size)


def sgld(
    potential: LocalizedPotential,
    step_size: float,
    *,
    deterministic: bool = False,
    mala_every: int = 10,
) -> Sampler:
    r"""SGLD: :math:`w \leftarrow w - \tfrac{\epsilon}{2}\nabla U_B(w) + \mathcal N(0, \epsilon I)`.

    Welling & Teh (2011); Lau et al. (2023) for the LLC.  ``deterministic=True``
    declares full-batch gradients (enables the free every-step MALA diagnostic).
    """
    return _make_sampler(
        "sgld", potential, step_size, deterministic=deterministic, mala_every=mala_every,
        rmsprop=None,
    )


def rmsprop_sgld(
    potential: LocalizedPotential,
    step_size: float,
    *,
    alpha: float = 0.99,
    eps: float = 0.1,
    deterministic: bool = False,
    mala_every: int = 10,
) -> Sampler:
    r"""RMSProp-preconditioned SGLD.

    :math:`v \leftarrow \alpha v + (1-\alpha)(\nabla L_B)^2`,
    :math:`G = 1/(\sqrt v + a)`,
    :math:`w \leftarrow w - \tfrac{\epsilon}{2} G \odot \nabla U_B(w) + \sqrt{\epsilon G}\,\xi`.

    Li, Chen, Carlson & Carin (2016); Hitchcock & Hoogland (2025, arXiv
    2507.21449), whose defaults α = 0.99, a = 0.1 are used.  The preconditioner
    depends on the chain's history, so the chain targets the posterior only
    approximately; in exchange flat directions get larger steps.
    """
    return _make_sampler(
        "rmsprop_sgld", potential, step_size, deterministic=deterministic,
        mala_every=mala_every, rmsprop=(alpha, eps),
    )


SAMPLERS: dict[str, Callable[..., Sampler]] = {"sgld": sgld, "rmsprop_sgld": rmsprop_sgld}
_ALIASES = {"rmsprop": "rmsprop_sgld", "rmspropsgld": "rmsprop_sgld", "rmsprop-sgld": "rmsprop_sgld"}


def build_sampler(
    name: str, potential: LocalizedPotential, step_size: float, **kwargs: Any
) -> Sampler:
    """Build a sampler by name (``"sgld"`` or ``"rmsprop_sgld"``)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[key](potential, step_size, **kwargs)
