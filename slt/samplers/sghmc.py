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

``friction="auto"`` (the default) damps critically the directions that the localization alone holds:
such a direction has curvature γ in U, and underdamped dynamics relax it fastest at the friction
:math:`2\sqrt{\eta\gamma}` per step, that is

.. math:: \alpha = \min\bigl(1, \sqrt{2\epsilon\gamma}\bigr),

per row when ε is per row.  There it relaxes in about :math:`1/\sqrt{\eta\gamma} = 2/\alpha` steps
against SGLD's :math:`1/(\eta\gamma)` (``Sampler.relaxation_gain`` = 1/α, counting the slower
:math:`t e^{-t}` of critical damping), and the stiffer directions, which oscillate, exchange energy with the
bath every 1/α steps.  On a Gaussian mode of curvature h the stationary variance is :math:`(1 + x/4 + O(x^2))/h`
with :math:`x = \eta h` for any α, against SGLD's :math:`(1 + x/2 + O(x^2))/h`, so at SGLD's step size
SGHMC's discretisation bias is about half SGLD's.  Minibatch gradient noise, on the other hand, heats
it 1/α times more (excess temperature :math:`\tfrac{\epsilon}{4\alpha}(n\beta)^2\sigma^2`).

The MALA diagnostic is not defined for this sampler (``mala_accept`` is ``None``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .base import (LocalizedPotential, Sampler, SamplerInfo, SamplerSpec, check_step_size, column_chunks, initial_params,
                   owned_normal, zeros_like_params,
                   reset_rows, sqrt)

__all__ = ["SGHMCState", "sghmc", "critical_friction"]


class SGHMCState(NamedTuple):
    """``params`` (C, d); ``velocity`` (C, d), the last parameter change; ``step`` steps taken."""

    params: Tensor
    velocity: Tensor
    step: int


def friction_follows_step(kwargs: Mapping[str, Any]) -> bool:
    """Whether SGHMC with these keyword arguments re-binds its friction to the step (``friction="auto"``,
    the default of :func:`sghmc`): α = √(2εγ) changes whenever ε does, as during step-size adaptation."""
    friction = kwargs.get("friction", inspect.signature(sghmc).parameters["friction"].default)
    return isinstance(friction, str) and friction == "auto"


def sghmc(
    potential: LocalizedPotential | None = None,
    step_size: float | None = None,
    *,
    friction: float | str = "auto",
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
        α ∈ (0, 1]: the fraction of velocity lost per step (1 = SGLD); ``"auto"`` (default):
        :func:`critical_friction`, :math:`\min(1, \sqrt{2\epsilon\gamma})`, per row.
    deterministic, mala_every
        Accepted for the engine's interface; no MALA diagnostic is computed.
    """
    auto = isinstance(friction, str) and friction == "auto"
    if not auto and not (isinstance(friction, (int, float)) and not isinstance(friction, bool)
                         and 0.0 < friction <= 1.0):
        raise ValueError(f"sghmc friction must lie in (0, 1] or be 'auto', got {friction!r}")
    if potential is None:
        return SamplerSpec("sghmc", sghmc, {"friction": "auto" if auto else float(friction)})
    check_step_size(step_size)
    if auto:
        friction = critical_friction(step_size, potential.localization)
    eta = 0.5 * step_size
    noise_std = sqrt(friction * step_size)
    # a direction held by γ alone relaxes in ~1/α steps (critical damping) against 1/(ηγ) under SGLD
    gain = _relaxation_gain(friction, step_size, potential.localization)

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

    return Sampler("sghmc", init, step, step_size, reset, relaxation_gain=gain, friction=friction)


def critical_friction(step_size: float | Tensor, localization: float) -> float | Tensor:
    r"""The friction that damps critically a direction held by the localization alone:
    :math:`\alpha = \min(1, 2\sqrt{\eta\gamma}) = \min(1, \sqrt{2\epsilon\gamma})` (η = ε/2), a number or
    per row like ``step_size``; 1 (SGLD) without localization.

    The mode :math:`u` of curvature γ follows :math:`u'' = -\eta\gamma\,u - \alpha\,u'` per step in the
    continuous limit, critically damped at :math:`\alpha = 2\sqrt{\eta\gamma}`."""
    if localization <= 0:
        return 1.0
    a = step_size * (2.0 * localization)
    return a.sqrt().clamp(max=1.0) if isinstance(a, Tensor) else min(1.0, math.sqrt(a))


def _relaxation_gain(friction: Any, step_size: Any, localization: float) -> float:
    """How many times faster than SGLD a direction held by γ alone relaxes, at least 1.  Per step its
    amplitude follows :math:`u'' + \\alpha u' + \\eta\\gamma u = 0`, whose slowest rate is
    :math:`r = (\\alpha - \\sqrt{\\max(0, \\alpha^2 - 4\\eta\\gamma)})/2` (α = 1: r ≈ ηγ, SGLD's; critical
    damping: r = α/2 = √(ηγ)); the gain is r/(ηγ), halved for the slower :math:`t e^{-rt}` of critical
    damping.  Read at the smallest ε and the largest α of the rows (the slowest row)."""
    if localization <= 0:
        return 1.0
    eta_gamma = float(torch.as_tensor(step_size).min()) * 0.5 * localization
    alpha = float(torch.as_tensor(friction).max())
    if not eta_gamma > 0:
        return 1.0
    rate = 0.5 * (alpha - math.sqrt(max(0.0, alpha * alpha - 4.0 * eta_gamma)))
    return max(1.0, 0.5 * rate / eta_gamma)
