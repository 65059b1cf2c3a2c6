r"""Stochastic gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin 2014, ICML).

In the parametrization of Chen et al. (eq. 15) with velocity :math:`v` (parameter
change per step), learning rate :math:`\eta` and friction :math:`\alpha`:

.. math::

    v \leftarrow (1-\alpha)\,v - \eta\,\nabla U_B(w) + \mathcal N(0, 2\alpha\eta\, I), \qquad
    w \leftarrow w + v ,

with the minibatch-noise estimate :math:`\hat\beta = 0` (the usual choice).  Here
:math:`\eta = \epsilon/2`, so ``step_size`` ε means what it means for SGLD: with
``friction=1`` the velocity is forgotten every step and the update *is* SGLD,
:math:`w \leftarrow w - \tfrac\epsilon2\nabla U_B + \mathcal N(0, \epsilon I)`.
A smaller friction keeps momentum for about :math:`1/\alpha` steps, so chains
travel ballistically along flat directions instead of diffusing (the continuous
limit is underdamped Langevin dynamics with time step :math:`\sqrt{\eta}` and
friction :math:`\alpha/\sqrt{\eta}`, whose stationary law is :math:`e^{-U}`).

The MALA diagnostic is not defined for this sampler (``mala_accept`` is ``None``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .base import (LocalizedPotential, Sampler, SamplerInfo, SamplerSpec, check_step_size, column_chunks, initial_params,
                   owned_normal, zeros_like_params,
                   reset_rows, sqrt)

__all__ = ["SGHMCState", "sghmc"]


class SGHMCState(NamedTuple):
    """``params`` (C, d); ``velocity`` (C, d), the last parameter change; ``step`` steps taken."""

    params: Tensor
    velocity: Tensor
    step: int


def sghmc(
    potential: LocalizedPotential | None = None,
    step_size: float | None = None,
    *,
    friction: float = 0.1,
    deterministic: bool = False,
    mala_every: int = 10,
) -> Sampler | SamplerSpec:
    r"""SGHMC: :math:`v \leftarrow (1-\alpha)v - \tfrac\epsilon2\nabla U_B(w) + \sqrt{\alpha\epsilon}\,\xi`, :math:`w \leftarrow w + v`.

    Parameters
    ----------
    potential, step_size
        The potential and ε (SGLD units: η = ε/2).  Without a potential the
        function returns the :class:`SamplerSpec` for ``slt.estimate_llc(sampler=...)``.
    friction
        α ∈ (0, 1]: the fraction of velocity lost per step (1 = SGLD).
    deterministic, mala_every
        Accepted for the engine's interface; no MALA diagnostic is computed.
    """
    if not (isinstance(friction, (int, float)) and 0.0 < friction <= 1.0):
        raise ValueError(f"sghmc friction must lie in (0, 1], got {friction!r}")
    if potential is None:
        return SamplerSpec("sghmc", sghmc, {"friction": float(friction)})
    check_step_size(step_size)
    eta = 0.5 * step_size
    noise_std = sqrt(friction * step_size)

    def init(params: Tensor) -> SGHMCState:
        params = initial_params(params)  # w* broadcast rows are kept without a copy: steps never write inputs
        return SGHMCState(params, zeros_like_params(params), 0)

    def step(state: SGHMCState, batch, rng) -> tuple[SGHMCState, SamplerInfo]:
        # the new velocity is built in the (owned) noise buffer and ∇U formed a chunk of columns at a
        # time; ∇L is dropped before w + v is allocated.  Inputs are never written.
        w = state.params
        loss, grad, U = potential.loss_grad(w, batch)
        v = owned_normal(rng, w)
        for sl in column_chunks(w):
            gU = potential.grad_U_cols(w, grad, sl)
            # (1-α)v - η∇U + σξ, in the order (and so the rounding) of the formula
            t = (1.0 - friction) * state.velocity[:, sl] - gU.mul_(eta)
            x = v[:, sl]
            torch.add(t, x.mul_(noise_std), out=x)
        del grad
        info = SamplerInfo(loss.detach(), U.detach(), None, None)
        return SGHMCState(w + v, v, state.step + 1), info

    def reset(state: SGHMCState, rows: Tensor, w_star: Tensor) -> SGHMCState:
        return SGHMCState(reset_rows(state.params, rows, w_star), reset_rows(state.velocity, rows, 0.0), state.step)

    return Sampler("sghmc", init, step, step_size, reset)
